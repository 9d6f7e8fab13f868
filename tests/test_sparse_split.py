"""The builder's batch split on synthetic vLLM metadata, through the kernels (CPU
interpreter), against the reference: decodes and short prefills stay on the stock path, the
long-prefill suffix is planned relative to its first token, and the page lists built from
the batch's block-table rows reproduce the reference block-sparse attention."""
import os

import pytest
import torch

from vllm_xattn.backends.sparse_prefill import SparseStep, plan_sparse_suffix
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


def test_split_and_page_lists_match_reference():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = XAttnConfig(block_size=64, stride=4, threshold=0.8, min_sparse_tokens=128)
    hq, hkv, d, page = 4, 2, 16, 16
    p = make_problem((list(zip(QUERY_LENS, SEQ_LENS)), hq, hkv, d, 64, 4, page, 16, 16), "cpu")
    q, k, v, qsl, cu_k, kv, bt = (p[x] for x in ("q", "k", "v", "cu_q", "cu_k", "kv", "bt"))

    first, plan = plan_sparse_suffix(qsl, torch.tensor(SEQ_LENS), cfg, block_m=16, block_n=16)
    assert first == 3  # decodes and the 40-token prefill stay dense
    step = SparseStep.from_host_plan(plan, block_table=bt[first:].to(dev), tok_start=int(qsl[first]),
                                     tok_end=int(qsl[-1]), selection_heads=hq, device=dev)
    assert plan.num_q_tokens == step.tok_end - step.tok_start == sum(QUERY_LENS[first:])

    kv = kv.to(dev)
    q_sp = q[step.tok_start:step.tok_end]
    a = antidiagonal_scores_paged(q_sp.to(dev), kv, step.block_table, step.plan)
    counts, ids = select_blocks_packed(a, step.plan, threshold=cfg.threshold)
    lists = build_page_lists(counts, ids, step.block_table, kv, step.plan,
                             cu_seqlens_q=step.mini_cu_seqlens_q, row_pos=step.mini_row_pos,
                             seqused_q=step.mini_seqused_q)

    # Reference on the suffix's requests alone, with the same selection.
    masks = masks_from_selection(counts, ids, step.plan)
    sub_q = qsl[first:] - qsl[first]
    sub_k = cu_k[first:] - cu_k[first]
    k_sp, v_sp = k[int(cu_k[first]):], v[int(cu_k[first]):]
    want = block_sparse_attention(q_sp, k_sp, v_sp, sub_q, sub_k, masks, block_size=cfg.block_size)

    # Execute the page lists the way FA3 does (bottom-right causal per mini-request) on
    # the head-major query rows the executor sees.
    q_hm = q_sp.transpose(0, 1).reshape(-1, 1, d)
    got = attend_page_lists({"kv": kv}, lists, q_hm, 1).view(hq, -1, d).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_no_split_without_long_prefills():
    cfg = XAttnConfig(block_size=64, min_sparse_tokens=128)
    assert plan_sparse_suffix(torch.tensor([0, 1, 2, 42]), torch.tensor([300, 90, 40]), cfg) is None


def test_scratch_bounds_hold_for_adversarial_batches():
    """Many short, misaligned sparse chunks (each touching Tq/B + 2 query blocks) and one
    long one must fit the pool sized from the scheduler limits."""
    from vllm_xattn.backends.sparse_prefill import ScratchPool

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
        _, plan = plan_sparse_suffix(qsl, torch.tensor(seqs), cfg)
        pool.check_fits(plan, sum(qlens), 2, 16)
        if qlens[0] == 66:
            assert plan.total_q_blocks == 45  # really Tq/B + 2 blocks each


def test_a_long_prefill_before_a_short_request_runs_dense_with_a_warning(monkeypatch):
    """Another runner's order (long prefill, then a short prefill, then another long one): the
    suffix is the last request only, and the skipped long prefill is reported, not silent."""
    from vllm_xattn.backends import sparse_prefill as sp

    warnings = []
    monkeypatch.setattr(sp.logger, "warning_once", lambda msg, *a: warnings.append(msg))
    cfg = XAttnConfig(block_size=64, stride=4, min_sparse_tokens=128)
    qsl, seqs = torch.tensor([0, 200, 240, 440]), torch.tensor([200, 40, 300])
    assert sp._sparse_suffix(qsl, seqs, min_sparse_tokens=128, block_size=64) == (2, 1)
    first, _ = sp.plan_sparse_suffix(qsl, seqs, cfg)
    assert first == 2 and len(warnings) == 1 and "ran dense" in warnings[0]
    warnings.clear()
    sp.plan_sparse_suffix(torch.tensor([0, 40, 240]), torch.tensor([40, 200]), cfg)  # V2 order
    assert warnings == []
