"""Block selection (XAttention step 2) on the packed scores, on the device, no host sync.

One program per (head, packed row). Rules match vllm_xattn.reference.select_blocks exactly:
sink j=0 and diagonal j=i always kept; the optional blocks 1..i-1 ranked by descending mass,
ties to the lower j, and a prefix of that order kept: threshold keeps the block at rank p iff
the forced mass plus the masses ranked before it is < tau * total; top-k / ratio keep a count.

No sort: masses are >= 0, so their float bit patterns order like the values, and "the masses
ranked before block j" are the ones at a higher level plus the equal ones at a lower j. A
bisection over bit levels (31 masked sums) finds the lowest level whose first block is still
kept; every higher level is kept whole, and within that level a prefix in j order (one
cumsum). Top-k is the same search with weight 1 per block and the count as the limit.

Outputs: counts int32 [H, TQB]; ids int32 [H, TQB, max_kb], ascending key blocks with the
diagonal LAST (entries past count undefined). ``counts.sum()`` is the number selected.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .plan import XAttnPlan

Tensor = torch.Tensor
_MODES = {"threshold": 0, "topk": 1, "ratio": 1}


# Output strides change with the batch (rows x key blocks): not specialised on (no recompiles).
@triton.jit(do_not_specialize=["s_ch", "s_ih", "s_ir"])
def _select_kernel(
    a_ptr, row_block_ptr, tau_ptr, k_ptr, cnt_ptr, ids_ptr,
    s_ah, s_ar, s_ch, s_ih, s_ir,
    TOPK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.load(row_block_ptr + row)
    j = tl.arange(0, BLOCK_K)
    cand = j <= i
    a = tl.load(a_ptr + h.to(tl.int64) * s_ah + row.to(tl.int64) * s_ar + j, mask=cand, other=0.0)
    a = tl.maximum(a, 0.0)  # masses are >= 0; also maps -0.0 to +0.0 for the bit trick
    forced = (j == 0) | (j == i)
    other = cand & (j != 0) & (j != i)
    bits = a.to(tl.int32, bitcast=True)  # >= 0 floats: bit order == value order

    # Blocks are weighted w (mass, or 1 for top-k); a block is kept iff base + the weight
    # ranked before it < lim.
    if TOPK:
        kk = tl.load(k_ptr + row)
        n_forced = tl.where(i == 0, 1, 2)
        n_take = tl.minimum(tl.maximum(kk - n_forced, 0), tl.maximum(i - 1, 0))  # <= optional blocks
        w = tl.where(other, 1.0, 0.0)
        base = 0.0
        lim = n_take.to(tl.float32)  # exact: counts < 2^24
    else:
        tau = tl.load(tau_ptr + h)
        w = tl.where(other, a, 0.0)
        base = tl.sum(tl.where(forced, a, 0.0), 0)  # like the reference, forced mass first
        lim = tl.where(tau >= 1.0, float("inf"), tau * tl.sum(a, 0))  # tau >= 1: keep all
    # v0 = the lowest bit level v with base + (weight of levels above v) < lim; the predicate
    # is monotone in v. Invariant: false at lo, true at hi (0x7F800000, +inf's pattern, which
    # no mass has, stands for "nothing kept" when even base >= lim). hi - lo < 2^31 keeps the
    # bounds and mid in int32 (5 instructions per step, 14 in int64); 31 halvings end at
    # width 1. (Stopping once the window held one level, checked every 4 halvings, ran no
    # faster at 32K and 53 % slower at 128K on near-uniform masses, which need most of the 31:
    # benchmarks/results/selection_80fdb2f_vs_early_exit_h100.json.)
    lo = tl.full([], -1, tl.int32)
    hi = tl.full([], 0x7F800000, tl.int32)
    for _ in range(31):
        mid = lo + ((hi - lo) >> 1)
        ok = base + tl.sum(tl.where(bits > mid, w, 0.0), 0) < lim
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid)
    v0 = hi
    # Levels above v0 are kept whole; level v0 (non-empty unless v0 is 0 or the sentinel: the
    # predicate changes only where a level has weight) keeps its blocks in j order while the
    # weight before each stays under the limit.
    above = other & (bits > v0)
    tie = other & (bits == v0)
    tie_w = tl.where(tie, w, 0.0)
    before = base + tl.sum(tl.where(above, w, 0.0), 0) + tl.cumsum(tie_w, 0) - tie_w
    kept = above | (tie & (before < lim))
    sel = forced | kept
    nd = sel & (j != i)  # everything but the diagonal, ascending
    pos = tl.cumsum(nd.to(tl.int32), 0) - 1
    cnt = tl.sum(nd.to(tl.int32), 0) + 1
    ids_row = ids_ptr + h.to(tl.int64) * s_ih + row.to(tl.int64) * s_ir
    tl.store(ids_row + pos, j, mask=nd)
    tl.store(ids_row + cnt - 1, i)
    tl.store(cnt_ptr + h * s_ch + row, cnt)


def _default_warps(mode: str, block_k: int) -> int:
    return 1 if mode == "threshold" and block_k <= 1024 else 4


def selection_block_k(max_kb: int) -> int:
    """The selection kernel's BLOCK_K (a constexpr: one compiled variant per value) for a step
    whose longest request has ``max_kb`` key blocks."""
    return max(16, triton.next_power_of_2(max_kb))


def select_blocks_packed(
    a_packed: Tensor,
    plan: XAttnPlan,
    *,
    mode: str = "threshold",
    threshold: float | Tensor = 0.9,
    topk: int | None = None,
    ratio: float | None = None,
    granularity: str = "head",
    num_kv_heads: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Select key blocks per (head, packed row) of ``a_packed`` [Hq, TQB, max_kb].

    threshold: float or float32 tensor [Hq] (e.g. a row of a [layers, heads] table).
    granularity "kv_group": sum each group's scores, select per kv head with tau = max over
    the group, return per-query-head outputs (the group's rows repeated).
    num_warps: per row (program). Default: threshold 1 warp up to 1024 key blocks (its 31
    masked sums reduce over shuffles, no shared memory; 0.28 vs 0.41 ms for 4 warps and 0.66
    for 8 at 128K), else 4; top-k / ratio 4 (benchmarks/results/selection_warps_h100.json).
    Returns (counts int32 [Hq, TQB], ids int32 [Hq, TQB, max_kb]).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    hq, tqb, max_kb = a_packed.shape
    dev = a_packed.device
    rb = plan.row_block
    if mode == "threshold":
        tau = (threshold.to(device=dev, dtype=torch.float32).reshape(hq) if isinstance(threshold, Tensor)
               else torch.full((hq,), float(threshold), dtype=torch.float32, device=dev))
        k_row = rb  # unused
    else:
        tau = torch.ones(hq, dtype=torch.float32, device=dev)  # unused
        if mode == "topk":
            if not isinstance(topk, int) or topk < 1:
                raise ValueError(f"topk must be an int >= 1, got {topk!r}")
            k_row = torch.full_like(rb, min(topk, 2**31 - 1))
        else:
            if ratio is None or not 0.0 < float(ratio) <= 1.0:
                raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
            k_row = torch.ceil(float(ratio) * (rb + 1).double()).to(torch.int32)  # float64 like the reference
    g = 1
    a = a_packed
    if granularity == "kv_group":
        if not num_kv_heads or hq % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide Hq={hq}, got {num_kv_heads!r}")
        g = hq // num_kv_heads
        if g > 1:
            # Rows padded to 16 floats: the kernel specialises on this buffer's strides, which
            # so stay in one class for every step (no recompile mid-serving; the warm-up's).
            kb16 = -(-max_kb // 16) * 16
            a = torch.empty(num_kv_heads, tqb, kb16, dtype=a_packed.dtype, device=dev)[:, :, :max_kb]
            torch.sum(a_packed.view(num_kv_heads, g, tqb, max_kb), 1, out=a)
            tau = tau.view(num_kv_heads, g).amax(1)
    elif granularity != "head":
        raise ValueError(f"granularity must be 'head' or 'kv_group', got {granularity!r}")
    a = a.contiguous() if a.stride(2) != 1 else a
    hs = a.shape[0]
    counts = torch.empty(hs, tqb, dtype=torch.int32, device=dev)
    ids = torch.empty(hs, tqb, max_kb, dtype=torch.int32, device=dev)
    block_k = selection_block_k(max_kb)
    _select_kernel[(tqb, hs)](
        a, rb, tau, k_row, counts, ids,
        a.stride(0), a.stride(1), counts.stride(0), ids.stride(0), ids.stride(1),
        TOPK=_MODES[mode], BLOCK_K=block_k, num_warps=num_warps or _default_warps(mode, block_k),
    )
    if g > 1:
        counts = counts.repeat_interleave(g, 0)
        ids = ids.repeat_interleave(g, 0)
    return counts, ids


def masks_from_selection(counts: Tensor, ids: Tensor, plan: XAttnPlan) -> list[Tensor]:
    """Per-request bool masks [Hq, n_qb, n_kb] (reference layout) from packed ids; for tests."""
    counts, ids = counts.cpu(), ids.cpu().long()
    hq, tqb, max_kb = ids.shape
    valid = torch.arange(max_kb)[None, None, :] < counts[:, :, None]
    full = torch.zeros(hq, tqb, max_kb + 1, dtype=torch.bool)
    full.scatter_(2, torch.where(valid, ids, max_kb), True)
    res = []
    for _, ctx, n, qb0, off in plan.req_meta.cpu().tolist():
        B = plan.block_size
        n_qb, n_kb = (n - 1) // B - qb0 + 1, (n - 1) // B + 1
        res.append(full[:, off : off + n_qb, :n_kb])
    return res
