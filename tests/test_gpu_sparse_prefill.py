"""The sparse prefill path (kernels + FA3 executor over the paged cache) vs the reference."""
import pytest
import torch

from vllm_xattn import reference as ref
from vllm_xattn.backends.sparse_prefill import ScratchPool, SparsePrefill, SparseStep
from vllm_xattn.config import XAttnConfig
from vllm_xattn.kernels import (
    antidiagonal_scores_paged, make_paged_cache, masks_from_selection, plan_prefill,
    select_blocks_packed,
)

pytestmark = pytest.mark.gpu

# (query length, sequence length): a fresh prompt, chunks with context before them
# (one starting mid-block), and partial last blocks.
REQS = [(3000, 3000), (2500, 9000), (700, 5013)]


@pytest.mark.parametrize("granularity", ["head", "kv_group"])
@pytest.mark.parametrize("selection", [dict(threshold=0.9), dict(threshold=1.0),
                                       dict(selection="ratio", ratio=0.3)])
@pytest.mark.parametrize("hq, hkv, d, page", [(8, 2, 128, 16), (14, 2, 64, 32)])
def test_sparse_prefill_matches_reference(granularity, selection, hq, hkv, d, page):
    torch.manual_seed(0)
    cfg = XAttnConfig(granularity=granularity, **selection)
    tq = [a for a, _ in REQS]
    n = [b for _, b in REQS]
    cu_q = torch.tensor([0] + torch.tensor(tq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)
    dev = "cuda"
    # Peaky attention (like real models) so that selections are really sparse.
    k = torch.randn(int(cu_k[-1]), hkv, d, device=dev).to(torch.bfloat16)
    v = torch.randn_like(k)
    q = (2.0 * torch.randn(int(cu_q[-1]), hq, d, device=dev)).to(torch.bfloat16)
    kv_cache, bt = make_paged_cache(k, v, cu_k, page, num_pages_extra=5,
                                    generator=torch.Generator().manual_seed(1))
    step = SparseStep.from_host_plan(
        plan_prefill(cu_q, n, block_size=cfg.block_size, stride=cfg.stride), block_table=bt,
        tok_start=0, tok_end=int(cu_q[-1]), device=dev,
        selection_heads=hkv if granularity == "kv_group" else hq)
    plan = step.plan
    pool = ScratchPool(max_tokens=int(cu_q[-1]), max_reqs=4, max_seq_len=max(n), num_q_heads=hq,
                       head_dim=d, dtype=q.dtype, cfg=cfg, page_size=page, device=torch.device(dev))
    sp = SparsePrefill(cfg, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5,
                       thresholds=None)
    out = torch.zeros_like(q)
    n_sel = sp.run(q, kv_cache, step, out, pool)

    # The same selection, as masks, through the reference attention in float32.
    a = antidiagonal_scores_paged(q, kv_cache, bt, plan)
    counts, ids, _ = select_blocks_packed(a, plan, mode=cfg.selection, threshold=cfg.threshold,
                                          ratio=cfg.ratio, granularity=granularity, num_kv_heads=hkv)
    masks = [m.to(dev) for m in masks_from_selection(counts, ids, plan)]
    want = ref.block_sparse_attention(q.float(), k.float(), v.float(), cu_q.to(dev), cu_k.to(dev),
                                      masks, block_size=cfg.block_size)
    err = ((out.float() - want).norm() / want.norm()).item()
    assert err < 1e-2, err
    assert int(n_sel) == int(counts.sum()), "n_selected"
    if selection.get("threshold") == 1.0:
        dense = ref.causal_attention(q.float(), k.float(), v.float(), cu_q.to(dev), cu_k.to(dev))
        assert ((out.float() - dense).norm() / dense.norm()).item() < 1e-2
    assert ref.density(masks) < 1.0 or selection.get("threshold") == 1.0
