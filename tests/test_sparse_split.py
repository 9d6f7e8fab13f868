"""The builder's batch split on synthetic vLLM metadata, through the kernels (CPU
interpreter), against the reference: decodes and short prefills stay on the stock path wherever
they sit in the batch, the sparse requests are planned together (their query rows packed), and
``SparsePrefill.run`` with an executor that attends the page lists reproduces the reference
block-sparse attention on their rows and leaves the other rows alone."""
import os

import pytest
import torch

from vllm_xattn.backends.sparse_prefill import ScratchPool, SparsePrefill, SparseStep, plan_sparse_requests
from vllm_xattn.config import XAttnConfig
from tests.test_kernels_interpret import attend_page_lists, make_problem
from vllm_xattn.kernels import (
    antidiagonal_scores_paged, build_page_lists, masks_from_selection, select_blocks_packed,
)
from vllm_xattn.reference import block_sparse_attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs the Triton interpreter or CUDA")

# A model-runner-V2 batch: decodes, a short prefill, then long prefill chunks (one fresh,
# one with context ending mid-block, one prefix-cache hit starting mid-block).
QUERY_LENS = [1, 1, 40, 200, 130, 150]
SEQ_LENS = [300, 90, 40, 200, 417, 350]
# Stock requests between sparse ones: V2's order with a long sequence's short last chunk
# (request 1) before a short prompt with a longer query (2), and another order's decode (4).
MIXED_QUERY_LENS = [1, 70, 90, 200, 1, 150]
MIXED_SEQ_LENS = [300, 417, 90, 200, 90, 350]


class PageListExecutor:
    """The executor's contract on the CPU: attend the page lists (FA3's bottom-right causal per
    mini-request) into the head-major output."""

    def run(self, q, out, counts, ids, kv_cache, step, pool, *, granularity, num_kv_heads, scale):
        lists = build_page_lists(counts, ids, step.block_table, kv_cache, step.plan, granularity=granularity,
                                 num_kv_heads=num_kv_heads, cu_seqlens_q=step.mini_cu_seqlens_q,
                                 row_pos=step.mini_row_pos, seqused_q=step.mini_seqused_q)
        out.copy_(attend_page_lists({"kv": kv_cache}, lists, q, q.shape[1]).to(out.dtype))


@pytest.mark.parametrize("query_lens, seq_lens, sparse, runs", [
    (QUERY_LENS, SEQ_LENS, [3, 4, 5], ((0, 0, 480),)),  # adjacent: one run, the batch's block-table rows
    (MIXED_QUERY_LENS, MIXED_SEQ_LENS, [1, 3, 5], ((0, 0, 70), (160, 70, 200), (361, 270, 150))),
])
@pytest.mark.parametrize("granularity", ["head", "kv_group"])
def test_split_runs_sparse_requests_like_the_reference(query_lens, seq_lens, sparse, runs, granularity):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = XAttnConfig(block_size=64, stride=4, threshold=0.8, min_sparse_tokens=128, granularity=granularity)
    hq, hkv, d, page = 4, 2, 16, 16
    p = make_problem((list(zip(query_lens, seq_lens)), hq, hkv, d, 64, 4, page, 16, 16), "cpu")
    q, k, v, qsl, cu_k, kv, bt = (p[x] for x in ("q", "k", "v", "cu_q", "cu_k", "kv", "bt"))

    split = plan_sparse_requests(qsl, torch.tensor(seq_lens), cfg, block_m=16, block_n=16)
    assert split.requests == sparse  # decodes and short prefills stay on stock FA
    assert split.stock == [(a, b) for a, b in zip([0] + [r + 1 for r in sparse], sparse + [len(seq_lens)]) if b > a]
    step = SparseStep.from_split(split, block_table=bt.to(dev), selection_heads=hq, device=dev, executor=None)
    step.executor = PageListExecutor()
    assert step.runs == runs and step.num_tokens == sum(query_lens[r] for r in sparse)
    assert torch.equal(step.block_table.cpu(), bt[sparse])

    pool = ScratchPool(max_tokens=1024, max_reqs=8, max_seq_len=512, num_q_heads=hq, head_dim=d,
                       dtype=torch.float32, cfg=cfg, page_size=page, device=dev)
    out = torch.full((q.shape[0], hq, d), 7.0, device=dev)
    sp = SparsePrefill(cfg, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5, thresholds=None)
    counts = sp.run(q.to(dev), kv.to(dev), step, out, pool)

    # Reference per sparse request with the same selection; the other rows untouched.
    masks = _selection_masks(q, kv.to(dev), step, cfg, counts)
    out = out.cpu()
    for i, r in enumerate(sparse):
        t0, t1 = int(qsl[r]), int(qsl[r + 1])
        k0, k1 = int(cu_k[r]), int(cu_k[r + 1])
        want = block_sparse_attention(q[t0:t1], k[k0:k1], v[k0:k1], torch.tensor([0, t1 - t0]),
                                      torch.tensor([0, k1 - k0]), [masks[i]], block_size=cfg.block_size)
        torch.testing.assert_close(out[t0:t1], want, rtol=1e-4, atol=1e-4)
    stock_rows = torch.ones(q.shape[0], dtype=torch.bool)
    for r in sparse:
        stock_rows[int(qsl[r]):int(qsl[r + 1])] = False
    assert (out[stock_rows] == 7.0).all()


def _selection_masks(q, kv, step, cfg, counts):
    """The selection ``SparsePrefill.run`` made, as per-request masks: scoring and selection
    again on the same inputs (deterministic), checked against the counts it returned."""
    a = antidiagonal_scores_paged(q[step.tok_start:step.tok_end].to(kv.device), kv, step.block_table, step.plan)
    c, ids = select_blocks_packed(a, step.plan, mode=cfg.selection, threshold=cfg.threshold,
                                  granularity=cfg.granularity, num_kv_heads=2)
    assert torch.equal(c.cpu(), counts.cpu())
    return masks_from_selection(c, ids, step.plan)


def test_no_split_without_long_prefills():
    cfg = XAttnConfig(block_size=64, min_sparse_tokens=128)
    assert plan_sparse_requests(torch.tensor([0, 1, 2, 42]), torch.tensor([300, 90, 40]), cfg) is None


def test_scratch_bounds_hold_for_adversarial_batches():
    """Many short, misaligned sparse chunks (each touching Tq/B + 2 query blocks) and one
    long one must fit the pool sized from the scheduler limits."""
    cfg = XAttnConfig(block_size=64, stride=4, min_sparse_tokens=64)
    max_tokens, max_reqs, max_len = 1024, 16, 4096
    pool = ScratchPool(max_tokens=max_tokens, max_reqs=max_reqs, max_seq_len=max_len,
                       num_q_heads=2, head_dim=16, dtype=torch.float32, cfg=cfg, page_size=16,
                       device="cpu")
    batches = [
        ([66] * 15, [64 * (i + 1) + 63 + 66 for i in range(15)]),  # 15 chunks touching 3 blocks
        ([1024], [4096]),
        ([64] * 16, [64 * (i + 2) + 1 for i in range(16)]),
    ]
    for qlens, seqs in batches:
        qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist())
        plan = plan_sparse_requests(qsl, torch.tensor(seqs), cfg).plan
        pool.check_fits(plan, sum(qlens), 2, 16)
        if qlens[0] == 66:
            assert plan.total_q_blocks == 45  # really Tq/B + 2 blocks each
