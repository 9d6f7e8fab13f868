"""The backend classes: inherited FA layout, CUDA-graph support, dense-only layers."""
import pytest
import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

from vllm_xattn.backends.xattn import (
    XAttentionBackend,
    XAttentionImpl,
    XAttentionMetadataBuilder,
    dense_only_reasons,
)


def test_kv_layout_is_flash_attn():
    args = (100, 16, 8, 128)
    assert XAttentionBackend.get_kv_cache_shape(*args) == FlashAttentionBackend.get_kv_cache_shape(*args)
    # The stride order is inherited, not overridden (its value needs a live config).
    assert "get_kv_cache_stride_order" not in XAttentionBackend.__dict__
    assert "do_kv_cache_update" not in XAttentionImpl.__dict__
    assert XAttentionBackend.get_impl_cls() is XAttentionImpl
    assert XAttentionBackend.get_builder_cls() is XAttentionMetadataBuilder


def test_full_cuda_graphs_only_for_uniform_batches():
    assert XAttentionMetadataBuilder.get_cudagraph_support(None, None) is AttentionCGSupport.UNIFORM_BATCH


def _impl(**kw):
    base = dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    base.update(kw)
    return XAttentionImpl(**base)


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({}, None),
        ({"sliding_window": 4096}, "sliding window"),
        ({"logits_soft_cap": 30.0}, "logits soft-cap"),
        ({"alibi_slopes": [0.5] * 8}, "ALiBi"),
        ({"attn_type": AttentionType.ENCODER_ONLY}, "attention type"),
        ({"attn_type": AttentionType.ENCODER_DECODER}, "attention type"),
        ({"kv_sharing_target_layer_name": "model.layers.0.self_attn.attn"}, "KV sharing"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype fp8"),
    ],
)
def test_dense_only_layers_recorded(kw, reason):
    try:
        impl = _impl(**kw)
    except AssertionError as e:  # FA impl refuses some combos without a GPU (e.g. sinks)
        pytest.skip(str(e))
    if reason is None:
        # Without a GPU no executor is available, which alone keeps a layer dense.
        assert len(impl.dense_reasons) == (impl.executor is None)
        assert impl.may_run_sparse == (impl.executor is not None)
    else:
        assert any(reason in r for r in impl.dense_reasons) and not impl.may_run_sparse


@pytest.mark.parametrize(
    "choice, fa, head, cap, want, words",
    [
        ("auto", 3, 128, (9, 0), "fa3", None),  # Hopper: FA3, measured faster
        ("auto", 2, 128, (8, 0), "flashinfer", None),  # Ampere: vLLM on FA2
        ("auto", 4, 64, (10, 0), "flashinfer", None),  # Blackwell: FA4, no FA3
        ("fa3", 3, 128, (9, 0), "fa3", None),
        ("fa3", 2, 128, (8, 0), None, "FlashAttention version 2 (executor fa3 needs FA3)"),
        ("flashinfer", 3, 128, (9, 0), "flashinfer", None),
        ("flashinfer", 3, 96, (9, 0), None, "executor flashinfer: head_size 96 (FlashInfer supports 64, 128"),
        ("flashinfer", 2, 128, (7, 5), None, "compute capability (7, 5) (FlashInfer needs >= 8.0)"),
        ("auto", 2, 80, (8, 6), None, "FlashAttention version 2 (no FA3) and no FlashInfer executor: head_size 80"),
        ("auto", None, 128, None, None, "compute capability None"),  # no GPU
    ],
)
def test_resolve_executor(choice, fa, head, cap, want, words):
    from vllm_xattn.backends.executors import resolve_executor

    got, why = resolve_executor(choice, fa_version=fa, head_size=head, capability=cap)
    assert got == want
    assert (why is None) == (want is not None)
    if words:
        assert words in why, why


def test_sinks_reason_without_constructing_fa():
    reasons = dense_only_reasons(alibi_slopes=None, sliding_window=None, logits_soft_cap=None,
                                 attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                                 sinks=torch.zeros(8))
    assert reasons == ["attention sinks"]


from vllm_xattn.backends.sparse_prefill import sparse_requests, stock_segments  # noqa: E402


@pytest.mark.parametrize(
    "query_lens, seq_lens, sparse, stock",
    [
        # decodes first, then prefills by ascending query length (model runner V2)
        ([1, 1, 300, 8192, 8192], [900, 20000, 300, 8192, 30000], [4], [(0, 4)]),
        ([1, 1, 300, 8192, 8192], [900, 20000, 300, 16384, 30000], [3, 4], [(0, 3)]),
        ([1, 1, 300], [900, 20000, 300], [], [(0, 3)]),  # nothing long enough
        ([8192], [8192], [], [(0, 1)]),  # below min_sparse_tokens
        ([16384], [16384], [0], []),  # a whole batch of one long prefill
        ([100, 9000], [30000, 30000], [1], [(0, 1)]),  # a 100-token chunk is shorter than a block
        # V2's order too: a 30K sequence's 2K last chunk before a 6K prompt (too short): the
        # chunk runs sparse, the prompt on stock FA after it
        ([1, 2000, 6000], [900, 30000, 6000], [1], [(0, 1), (2, 3)]),
        ([1, 2000, 6000, 9000], [900, 30000, 6000, 40000], [1, 3], [(0, 1), (2, 3)]),
        # other orders: stock requests anywhere between sparse ones
        ([9000, 5, 9000], [30000, 30000, 40000], [0, 2], [(1, 2)]),
        ([9000, 9000, 5], [30000, 30000, 40000], [0, 1], [(2, 3)]),
    ],
)
def test_sparse_requests_and_stock_segments(query_lens, seq_lens, sparse, stock):
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    got = sparse_requests(torch.tensor(qsl), torch.tensor(seq_lens), min_sparse_tokens=16384, block_size=128)
    assert got == sparse
    assert stock_segments(len(seq_lens), got) == stock


# ---------------------------------------------------------------- forward dispatch (CPU, mocked)
import dataclasses  # noqa: E402

from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl, FlashAttentionMetadata  # noqa: E402

from vllm_xattn.backends.xattn import XAttentionMetadata  # noqa: E402


def _fa_metadata(**kw):
    fields = {f.name: None for f in dataclasses.fields(FlashAttentionMetadata)
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    fields.update(num_actual_tokens=10, max_query_len=10, max_seq_len=10, use_cascade=False,
                  common_prefix_len=0)
    fields.update(kw)
    return FlashAttentionMetadata(**fields)


class _Recorder:
    def __init__(self):
        self.calls = []


@pytest.fixture
def dispatch(monkeypatch):
    rec = _Recorder()

    def fake_fa_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *a):
        # the rows it got: whole-batch calls (profiling, dense-only layers) record None
        whole = attn_metadata is None or isinstance(attn_metadata, XAttentionMetadata)
        rec.calls.append(("fa", attn_metadata, None if whole else query, None if whole else output))
        return output

    monkeypatch.setattr(FlashAttentionImpl, "forward", fake_fa_forward)
    impl = _impl()
    impl._layer_checked = True  # skip the per-layer setup (needs a GPU layer)

    class FakeSparse:
        def run(self, query, kv_cache, step, output, pool, keys=None):
            rec.calls.append(("sparse", step, output.shape, keys))

    monkeypatch.setattr(type(impl), "_scratch", lambda self, query: rec.calls.append(("scratch",)))
    return impl, FakeSparse(), rec


def _args():
    q = torch.zeros(10, 8, 64)
    return dict(layer=None, query=q, key=q[:, :2], value=q[:, :2], kv_cache=torch.zeros(1),
                output=torch.zeros(10, 8 * 64))


def test_forward_sparse_step_runs_stock_segments_then_sparse(dispatch):
    """Stock FA runs each segment of other requests on its own rows and metadata (a decode
    before the sparse requests, a short prompt between them), then the sparse path."""
    impl, sparse, rec = dispatch
    impl._sparse = sparse
    head, mid, step = _fa_metadata(num_actual_tokens=1), _fa_metadata(num_actual_tokens=3), object()
    full = XAttentionMetadata(**dataclasses.asdict(_fa_metadata()), stock=[(0, 1, head), (5, 8, mid)],
                              sparse=step)
    args = _args()
    args["query"] = torch.randn(10, 8, 64)
    impl.forward(attn_metadata=full, **args)
    assert [c[0] for c in rec.calls] == ["fa", "fa", "scratch", "sparse"]
    for (_, md, q, out), (a, b) in zip(rec.calls[:2], [(0, 1), (5, 8)]):
        assert md is (head if a == 0 else mid)
        assert torch.equal(q, args["query"][a:b])  # the segment's rows only
        assert out.data_ptr() == args["output"][a:b].data_ptr() and out.shape[0] == b - a
    assert rec.calls[3][1] is step
    assert rec.calls[3][2] == (10, 8, 64)  # output viewed per head
    assert rec.calls[3][3] is args["key"]  # the layer's new keys go to scoring (direct TMA keys)


def test_forward_all_sparse_skips_fa(dispatch):
    impl, sparse, rec = dispatch
    impl._sparse = sparse
    full = XAttentionMetadata(**dataclasses.asdict(_fa_metadata()), stock=[], sparse=object())
    impl.forward(attn_metadata=full, **_args())
    assert [c[0] for c in rec.calls] == ["scratch", "sparse"]


def test_forward_dense_only_layer_uses_full_batch_metadata(dispatch):
    impl, _, rec = dispatch
    impl._sparse = None  # e.g. sliding window, dense_layers, no FA3
    full = XAttentionMetadata(**dataclasses.asdict(_fa_metadata()), stock=[(0, 4, _fa_metadata())],
                              sparse=object())
    impl.forward(attn_metadata=full, **_args())
    assert rec.calls == [("fa", full, None, None)]


def test_forward_profiling_run_reserves_scratch(dispatch):
    impl, sparse, rec = dispatch
    impl._sparse = sparse
    impl.forward(attn_metadata=None, **_args())
    assert rec.calls == [("scratch",), ("fa", None, None, None)]


def test_density_log_records_sparse_layers_and_flushes_per_step(dispatch, monkeypatch, tmp_path):
    from vllm_xattn.backends import density_log as dl

    monkeypatch.setenv(dl.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(dl, "_log", None)
    impl, sparse, rec = dispatch
    counts = torch.arange(16, dtype=torch.int32).view(8, 2)  # 8 q heads x 2 query blocks

    class CountingSparse:
        def run(self, query, kv_cache, step, output, pool, keys=None):
            return counts

    impl._sparse, impl._layer_index, impl._head_offset = CountingSparse(), 5, 8  # TP rank 1
    step = type("Step", (), dict(num_tokens=8, candidate_blocks=40))()
    full = XAttentionMetadata(**dataclasses.asdict(_fa_metadata()), stock=[], sparse=step)
    impl.forward(attn_metadata=full, **_args())
    impl.forward(attn_metadata=full, **_args())
    assert dl.read_density(tmp_path)["candidates"] == 0  # nothing synced before the next step
    dl.density_log().flush()  # what the builder does at the start of the next build()
    got = dl.read_density(tmp_path)
    total = int(counts.sum())
    assert got["selected"] == 2 * total and got["candidates"] == 2 * 8 * 40
    assert got["density"] == pytest.approx(total / 320) and got["per_layer"] == {5: pytest.approx(total / 320)}
    # per (layer, global head): head h of this rank is global head 8 + h
    assert got["per_head"][(5, 8)] == pytest.approx(1 / 40) and got["per_head"][(5, 15)] == pytest.approx(29 / 40)
    line = (tmp_path / f"density-{__import__('os').getpid()}.jsonl").read_text().splitlines()[0]
    assert '"tokens": 8' in line and '"head_offset": 8' in line


def test_density_log_writes_a_step_once_its_host_copy_is_done(monkeypatch, tmp_path):
    """On the GPU the per-head sums reach the host behind an event: flush() never waits for
    it (no sync per step) but writes the step at a later flush, or at exit (wait=True)."""
    from vllm_xattn.backends import density_log as dl

    class Event:
        done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    events = []

    def to_host(sums):
        events.append(Event())
        return sums, events[-1]

    log = dl.DensityLog(str(tmp_path))
    monkeypatch.setattr(log, "_to_host", to_host)
    counts = torch.ones(4, 3, dtype=torch.int32)
    log.record(0, 16, 0, counts, 6)
    log.flush()  # copy started, not done: nothing written, nothing waited for
    assert dl.read_density(tmp_path)["candidates"] == 0 and not events[0].done
    log.record(1, 16, 0, counts, 6)
    events[0].done = True
    log.flush()  # step 0's copy is done: written; step 1's still copying
    assert dl.read_density(tmp_path)["per_layer"] == {0: 0.5}
    log.flush(wait=True)  # what exit does
    assert dl.read_density(tmp_path)["per_layer"] == {0: 0.5, 1: 0.5}


def test_sparse_step_counts_causal_candidates():
    from vllm_xattn.backends.sparse_prefill import SparseStep
    from vllm_xattn.kernels import plan_prefill

    # ctx 100 + 300 queries (keys 0..399: blocks 0..3 at B=128): query blocks 0..3 -> 1+2+3+4;
    # a second request of 128 queries, no context: 1.
    plan = plan_prefill([0, 300, 428], [400, 128], block_size=128, stride=8)
    step = SparseStep.from_host_plan(plan, block_table=torch.zeros(2, 4, dtype=torch.int32),
                                     tok_start=0, tok_end=428, selection_heads=2, device="cpu")
    assert step.candidate_blocks == 10 + 1


def test_plan_to_carries_extra_tensors_and_nones():
    from vllm_xattn.kernels import plan_prefill

    plan = plan_prefill([0, 300, 428], [400, 128], block_size=128, stride=8)
    extra = torch.arange(7, dtype=torch.int32)
    moved, got, none = plan.to("cpu", extra, None)
    assert none is None and torch.equal(got, extra)
    assert torch.equal(moved.row_q_start, plan.row_q_start) and moved.num_tiles == plan.num_tiles
    assert plan.to("cpu").total_q_blocks == plan.total_q_blocks  # no extras: just the plan


def test_scratch_compiles_the_sparse_path_once_per_pool(monkeypatch):
    """Whoever creates the process's scratch pool (the memory-profiling pass) warms the kernels
    up on it, once: the other layers share the pool and skip it."""
    from types import SimpleNamespace

    from vllm_xattn.backends import xattn

    pool = SimpleNamespace(warmed=False)
    monkeypatch.setattr(xattn.ScratchPool, "get", classmethod(lambda cls, **kw: pool))
    calls = []
    monkeypatch.setattr(xattn, "warm_up_sparse_path", lambda *a, **kw: calls.append(kw))
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=8192, max_num_seqs=16),
                          model_config=SimpleNamespace(max_model_len=65536, dtype=torch.bfloat16),
                          cache_config=SimpleNamespace(block_size=16))
    query = torch.zeros(10, 8, 64, dtype=torch.bfloat16)
    for layer in range(3):
        impl = _impl()
        impl._vllm_config, impl._sparse = cfg, object()
        assert impl._scratch(query) is pool and impl._scratch(query) is pool
    assert pool.warmed and len(calls) == 1
    assert calls[0]["max_model_len"] == 65536 and calls[0]["page_size"] == 16
    assert calls[0]["selection_heads"] == 8 and calls[0]["kv_dtype"] == torch.bfloat16
