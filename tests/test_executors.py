"""The FlashInfer executor's host side and plumbing on CPU (kernels in the Triton interpreter):
the step's upper-bound page lists, head chunks, and one plan serving several layers with
different selections, through a stand-in for FlashInfer's wrapper that computes attention
the way its paged prefill reads the buffers."""
import math
import os

import pytest
import torch

from vllm_xattn import reference as ref
from vllm_xattn.backends.executors import (
    FlashInferContext,
    FlashInferExecutor,
    densest_page_lists,
)
from vllm_xattn.backends.sparse_prefill import ScratchPool, SparsePrefill, SparseStep
from vllm_xattn.config import XAttnConfig
from vllm_xattn.kernels import (
    antidiagonal_scores_paged, build_page_csr, masks_from_selection, plan_prefill,
    select_blocks_packed,
)
from tests.test_kernels_interpret import make_problem

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU variant (Triton interpreter)")

REQS = [(70, 200), (130, 130), (33, 300)]  # (query length, sequence length)
HQ, HKV, D, B, S, PAGE = 4, 2, 16, 64, 4, 16


def problem(seed=0):
    p = make_problem((REQS, HQ, HKV, D, B, S, PAGE, 16, 16), "cpu", seed=seed)
    return tuple(p[x] for x in ("q", "k", "v", "cu_q", "cu_k", "kv", "bt", "plan"))


def test_densest_lists_are_the_all_blocks_selection():
    """The plan's upper bound is exactly the CSR of a layer that keeps every causal block."""
    q, k, v, cu_q, cu_k, kv, bt, plan = problem()
    heads, indptr, last = densest_page_lists(plan, selection_heads=HQ, page_size=PAGE, max_keys=2**31 - 1)
    assert heads == HQ and indptr.dtype == last.dtype == torch.int32
    counts, ids = select_blocks_packed(antidiagonal_scores_paged(q, kv, bt, plan), plan, threshold=1.0)
    csr = build_page_csr(counts, ids, bt, kv, plan)
    assert torch.equal(csr.indptr, indptr) and torch.equal(csr.last_page_len, last)


def test_densest_lists_split_heads_into_equal_chunks():
    _, _, _, _, _, _, _, plan = problem()
    _, one, _ = densest_page_lists(plan, selection_heads=1, page_size=PAGE, max_keys=2**31 - 1)
    per_head = int(one[-1]) * PAGE
    heads, indptr, last = densest_page_lists(plan, selection_heads=6, page_size=PAGE, max_keys=4 * per_head)
    assert heads == 3  # the largest divisor of 6 within the limit
    assert len(indptr) == 3 * plan.total_q_blocks + 1 and int(indptr[-1]) * PAGE == 3 * per_head
    assert densest_page_lists(plan, selection_heads=6, page_size=PAGE, max_keys=2**31 - 1, max_heads=2)[0] == 2
    with pytest.raises(RuntimeError, match="max_num_batched_tokens"):
        densest_page_lists(plan, selection_heads=6, page_size=PAGE, max_keys=per_head - 1)


class FakeWrapper:
    """BatchPrefillWithPagedKVCacheWrapper's plan()/run() contract, computed in torch: keys of
    mini-request b are the pages indices[indptr[b]:indptr[b+1]] of the K/V page views, the last
    one used up to last_page_len[b]; bottom-right causal; scale = plan sm_scale * q_scale."""

    def plan(self, *, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim_qk, page_size, causal, sm_scale, disable_split_kv, **_):
        assert causal and disable_split_kv and num_kv_heads == 1
        self.qo_indptr, self.group, self.sm_scale = qo_indptr, num_qo_heads, sm_scale
        self._paged_kv_indptr_buf = paged_kv_indptr
        self._paged_kv_indices_buf = paged_kv_indices
        self._paged_kv_last_page_len_buf = paged_kv_last_page_len
        self.runs = 0

    def run(self, q, kv, *, q_scale, out, enable_pdl):
        assert enable_pdl is False and q.shape[0] == int(self.qo_indptr[-1]) and q.shape[1] == self.group
        self.runs += 1
        k_pages, v_pages = kv
        page = k_pages.shape[1]
        ip, ind = self._paged_kv_indptr_buf, self._paged_kv_indices_buf
        last = self._paged_kv_last_page_len_buf
        for b in range(len(self.qo_indptr) - 1):
            pages = ind[int(ip[b]):int(ip[b + 1])].long()
            n_k = (len(pages) - 1) * page + int(last[b])
            kk = k_pages[pages].reshape(-1, q.shape[-1])[:n_k].float()
            vv = v_pages[pages].reshape(-1, q.shape[-1])[:n_k].float()
            q0, q1 = int(self.qo_indptr[b]), int(self.qo_indptr[b + 1])
            s = torch.einsum("tgd,nd->gtn", q[q0:q1].float(), kk) * (self.sm_scale * q_scale)
            allowed = torch.arange(n_k)[None, :] <= (n_k - (q1 - q0) + torch.arange(q1 - q0))[:, None]
            p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
            out[q0:q1] = torch.einsum("gtn,nd->tgd", p, vv).to(out.dtype)


class FakeContext(FlashInferContext):
    def __init__(self):
        self.wrapper = FakeWrapper()
        self._no_indices = torch.zeros(1, dtype=torch.int32)
        self.current = None
        self.plans = 0

    def plan(self, fs):
        self.wrapper.plan(paged_kv_indices=self._no_indices, **fs.plan_args)
        self.current = fs
        self.plans += 1


@pytest.mark.parametrize("granularity", ["head", "kv_group"])
@pytest.mark.parametrize("chunked", [False, True])
def test_one_plan_serves_layers_with_different_selections(monkeypatch, granularity, chunked):
    q, k, v, cu_q, cu_k, kv, bt, host_plan = problem(seed=1)
    ctx = FakeContext()
    monkeypatch.setattr(FlashInferContext, "take", classmethod(lambda cls, device: ctx))
    ex = FlashInferExecutor(num_q_heads=HQ, head_dim=D, page_size=PAGE, q_dtype=q.dtype, kv_dtype=q.dtype)
    hs = HKV if granularity == "kv_group" else HQ
    if chunked:  # room for half the selection heads per launch
        _, one, _ = densest_page_lists(host_plan, selection_heads=1, page_size=PAGE, max_keys=2**31 - 1)
        ex.MAX_KEYS_PER_RUN = int(one[-1]) * PAGE * hs // 2
    T = int(cu_q[-1])
    step = SparseStep.from_host_plan(host_plan, block_table=bt, tok_start=0, tok_end=T,
                                     selection_heads=hs, device="cpu", executor=ex)
    assert ctx.plans == 1 and step.executor_step.heads_per_run == (hs // 2 if chunked else hs)
    cfgs = [XAttnConfig(block_size=B, stride=S, granularity=granularity, threshold=0.95),
            XAttnConfig(block_size=B, stride=S, granularity=granularity, selection="topk", topk=2)]
    pool = ScratchPool(max_tokens=T, max_reqs=4, max_seq_len=max(n for _, n in REQS), num_q_heads=HQ,
                       head_dim=D, dtype=q.dtype, cfg=cfgs[0], page_size=PAGE, device="cpu")
    densities = []
    for layer, cfg in enumerate(cfgs):  # two layers, one plan
        sp = SparsePrefill(cfg, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, scale=0.3, thresholds=None)
        out = torch.zeros_like(q)
        sp.run(q, kv, step, out, pool)
        counts, ids = select_blocks_packed(antidiagonal_scores_paged(q, kv, bt, step.plan), step.plan,
                                              mode=cfg.selection, threshold=cfg.threshold, topk=cfg.topk,
                                              granularity=granularity, num_kv_heads=HKV)
        masks = masks_from_selection(counts, ids, step.plan)
        densities.append(ref.density(masks))
        want = ref.block_sparse_attention(q, k, v, cu_q, cu_k, masks, block_size=B, scale=0.3)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        assert ctx.wrapper.runs == (layer + 1) * (2 if chunked else 1)
    assert ctx.plans == 1
    assert densities[0] != densities[1]


def test_replanned_when_another_step_was_planned(monkeypatch):
    q, k, v, cu_q, cu_k, kv, bt, host_plan = problem(seed=2)
    ctx = FakeContext()
    monkeypatch.setattr(FlashInferContext, "take", classmethod(lambda cls, device: ctx))
    ex = FlashInferExecutor(num_q_heads=HQ, head_dim=D, page_size=PAGE, q_dtype=q.dtype, kv_dtype=q.dtype)
    T = int(cu_q[-1])
    kw = dict(block_table=bt, tok_start=0, tok_end=T, selection_heads=HQ, device="cpu", executor=ex)
    first = SparseStep.from_host_plan(host_plan, **kw)  # the builder's next step replaces its plan
    SparseStep.from_host_plan(plan_prefill([0, 64], [64], block_size=B, stride=S, block_m=16, block_n=16),
                              **{**kw, "tok_end": 64})
    cfg = XAttnConfig(block_size=B, stride=S, threshold=0.9)
    pool = ScratchPool(max_tokens=T, max_reqs=4, max_seq_len=300, num_q_heads=HQ, head_dim=D,
                       dtype=q.dtype, cfg=cfg, page_size=PAGE, device="cpu")
    out = torch.zeros_like(q)
    SparsePrefill(cfg, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, scale=D ** -0.5,
                  thresholds=None).run(q, kv, first, out, pool)
    assert ctx.plans == 3 and ctx.current is first.executor_step
    assert math.isfinite(float(out.abs().sum()))


def fake_fa3_varlen(calls):
    """Exact emulation of vLLM's FA3 ``flash_attn_varlen_func`` over a paged cache (causal,
    bottom-right aligned, ``seqused_k`` keys per sequence), recording its keyword arguments."""
    def fa3(*, q, k, v, cu_seqlens_q, seqused_k, block_table, softmax_scale, causal, out, **kw):
        calls.append(dict(kw, causal=causal))
        page = k.shape[1]
        for m in range(cu_seqlens_q.numel() - 1):
            a, b, n = int(cu_seqlens_q[m]), int(cu_seqlens_q[m + 1]), int(seqused_k[m])
            pages = block_table[m, : -(-n // page)].long()
            km, vm = (x[pages].reshape(-1, x.shape[2], x.shape[3])[:n].float() for x in (k, v))
            qm = q[a:b].float()  # (Lq, G, D); one KV head per sequence (folded views)
            s = torch.einsum("qgd,kd->gqk", qm, km[:, 0]) * softmax_scale
            i, j = torch.arange(b - a)[:, None], torch.arange(n)[None, :]
            s = s.masked_fill(j > n - (b - a) + i, float("-inf"))
            out[a:b] = torch.einsum("gqk,kd->qgd", s.softmax(-1), vm[:, 0]).to(out.dtype)
    return fa3


@pytest.mark.parametrize("granularity", ["head", "kv_group"])
def test_fa3_executor_page_lists_give_the_reference_and_one_split(monkeypatch, granularity):
    import sys
    import types

    calls = []  # the real module needs CUDA extensions: stand in for it
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn",
                        types.SimpleNamespace(flash_attn_varlen_func=fake_fa3_varlen(calls)))
    q, k, v, cu_q, cu_k, kv, bt, host_plan = problem(seed=2)
    T = int(cu_q[-1])
    hs = HKV if granularity == "kv_group" else HQ
    step = SparseStep.from_host_plan(host_plan, block_table=bt, tok_start=0, tok_end=T,
                                     selection_heads=hs, device="cpu")
    cfg = XAttnConfig(block_size=B, stride=S, granularity=granularity, threshold=0.9)
    pool = ScratchPool(max_tokens=T, max_reqs=4, max_seq_len=max(n for _, n in REQS), num_q_heads=HQ,
                       head_dim=D, dtype=q.dtype, cfg=cfg, page_size=PAGE, device="cpu")
    out = torch.zeros_like(q)
    counts = SparsePrefill(cfg, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, scale=0.3,
                           thresholds=None).run(q, kv, step, out, pool)
    ids = select_blocks_packed(antidiagonal_scores_paged(q, kv, bt, step.plan), step.plan,
                               threshold=0.9, granularity=granularity, num_kv_heads=HKV)
    assert torch.equal(counts, ids[0])
    want = ref.block_sparse_attention(q, k, v, cu_q, cu_k, masks_from_selection(*ids[:2], step.plan),
                                      block_size=B, scale=0.3)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    # FA3's split-KV heuristic must not run: it sizes float32 partial outputs of
    # [splits, heads * T, D] from a one-sequence view of the batch (the mixed-serving OOM).
    assert len(calls) == 1 and calls[0]["num_splits"] == 1 and calls[0]["fa_version"] == 3
