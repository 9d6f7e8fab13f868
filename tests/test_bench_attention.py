"""bench_attention: executor_flops counts the same FLOPs whatever the mini-request order, and
bench_inputs turns interleaved timings into records."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_attention import executor_flops  # noqa: E402

from vllm_xattn.kernels import plan_prefill  # noqa: E402
from vllm_xattn.kernels.page_lists import PageLists  # noqa: E402


def test_executor_flops_order_independent():
    # two requests, one with context ending mid-block: partial first and last blocks
    plan = plan_prefill([0, 300, 500], [300, 777], block_size=128, stride=16)
    heads = 3
    keys = plan.row_block.long() * 128 + plan.row_last_len.long()  # every causal key: dense
    sorted_lists = PageLists(page_table=torch.zeros(0), seqused_k=keys.repeat(heads).int(),
                             cu_seqlens_q=plan.mini_cu_seqlens_q(heads), max_seqlen_q=128,
                             max_seqlen_k=int(keys.max()))
    row_pos, starts, used_q = plan.mini_requests_longest_first(heads)
    by_pos = torch.empty_like(row_pos)
    by_pos[row_pos.long()] = torch.arange(row_pos.numel(), dtype=torch.int32)
    lf_lists = PageLists(page_table=torch.zeros(0), seqused_k=keys[by_pos.long()].repeat(heads).int(),
                         cu_seqlens_q=starts, max_seqlen_q=128, max_seqlen_k=int(keys.max()),
                         seqused_q=used_q)
    fl = executor_flops(sorted_lists, 1, 64)
    assert fl == executor_flops(lf_lists, 1, 64)
    # every key of every query row is causal attention over the whole batch, per head
    want = 0.0
    for tq, n in ((300, 300), (200, 777)):
        want += 4.0 * 64 * heads * (tq * (n - tq) + tq * (tq + 1) / 2)
    assert fl == want


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU variant (Triton interpreter)")
def test_bench_inputs_records_medians_of_within_round_ratios(monkeypatch):
    """bench_attention.bench_inputs on CPU: the kernels in the interpreter, a stand-in FA3
    executor and fake timings (dense 10 / 11 / 12 ms, the layer 2 ms, the executor 1 ms)."""
    from types import SimpleNamespace

    import bench_attention as ba
    import bench_common

    from vllm_xattn.backends.executors import Fa3Executor

    class NoKernelFa3(Fa3Executor):
        def launches(self, *a, **kw):
            yield lambda: None

    monkeypatch.setattr(ba, "FA3", NoKernelFa3())
    monkeypatch.setattr(ba, "dense_fa3", lambda *a, **k: (lambda: None))
    fake = {"dense": [10.0, 11.0, 12.0], "layer": [2.0, 2.0, 2.0], "exec0": [1.0, 1.0, 1.0]}
    monkeypatch.setattr(ba, "time_interleaved", lambda fns, rounds: {k: fake[k][:rounds] for k in fns})
    inputs = bench_common.paged_inputs([512], [512], **bench_common.SHAPES["qwen2.5-0.5b"], device="cpu")
    args = SimpleNamespace(stride=16, page_size=16, executor=["fa3"], granularity="head", rounds=3, profile=None)
    recs = ba.bench_inputs(*inputs, shape="qwen2.5-0.5b", inputs="captured layer_00.pt",
                           settings=[dict(selection="ratio", ratio=0.5), dict(threshold=0.9)], args=args)
    assert [r["selection"] for r in recs] == ["ratio", "threshold"]
    r = recs[0]
    assert r["inputs"] == "captured layer_00.pt" and r["seq_len"] == 512 and r["num_q_heads"] == 14
    assert r["speedup"] == pytest.approx(11.0 / 2.0) and r["dense_fa3_ms"] == 11.0
    assert r["executor_ms"] == 1.0 and 0.0 < r["density"] < 1.0
    dense_fl = bench_common.causal_flops([512], [512], 14, 64)
    assert r["executor_share_of_dense_throughput"] == pytest.approx(r["effective_tflops"] * 1e9 * 11.0 / dense_fl)
