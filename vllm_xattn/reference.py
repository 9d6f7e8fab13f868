"""Pure-PyTorch reference ("executable specification") of XAttention.

XAttention (Xu et al., ICML 2025) makes long prefills block-sparse:

1. ``antidiagonal_block_scores``: cheaply estimate how much attention mass each
   (query block, key block) pair gets, by summing strided antidiagonals of QK^T.
   Every ``stride`` x ``stride`` tile of QK^T collapses into one "super-token" score
   (one antidiagonal of the tile), softmaxed causally per super-row, then pooled
   into ``block_size`` x ``block_size`` blocks.
2. ``select_blocks``: per query block keep the fewest key blocks whose estimated
   mass reaches a threshold (or a top-k / ratio budget), always keeping the sink
   block 0 and the diagonal block.
3. ``block_sparse_attention``: exact softmax attention restricted to kept blocks.

Layout follows flash-attn varlen: ``q`` is [T_total, Hq, D], ``k``/``v`` are
[N_total, Hkv, D], and request r owns ``q[cu_q[r]:cu_q[r+1]]`` (Tq rows) and
``k[cu_k[r]:cu_k[r+1]]`` (N keys, N >= Tq). The queries are the LAST Tq positions
(``ctx = N - Tq`` tokens of context precede them: chunked prefill / prefix cache).
Blocks are at absolute positions: block b covers [b*B, (b+1)*B), so the first
query block ``qb0 = ctx // B`` may be partial, as may the last block.

All math is float32; this is meant for small/medium shapes and for testing the
Triton kernels, not for speed.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "antidiagonal_block_scores",
    "select_blocks",
    "density",
    "block_sparse_attention",
    "causal_attention",
    "xattention",
]

MODES = ("threshold", "topk", "ratio")
GRANULARITIES = ("head", "kv_group")
BLOCK_SIZES = (64, 128)
STRIDES = (4, 8, 16, 32)


# --------------------------------------------------------------------------- helpers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor | None = None) -> tuple[int, int, int]:
    """Returns (Hq, Hkv, G) after validating the varlen tensor shapes."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head_dim differ: {q.shape[2]} vs {k.shape[2]}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"num query heads ({hq}) must be a multiple of num kv heads ({hkv})")
    return hq, hkv, hq // hkv


def _check_blocking(stride: int, block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if stride not in STRIDES or block_size % stride:
        raise ValueError(f"stride must be one of {STRIDES} and divide block_size, got {stride!r}")


def _requests(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, t_total: int, n_total: int) -> Iterator[tuple[int, int, int, int]]:
    """Yields (q_start, q_end, k_start, k_end) per request, validating the varlen layout."""
    cq = [int(x) for x in torch.as_tensor(cu_seqlens_q).tolist()]
    ck = [int(x) for x in torch.as_tensor(cu_seqlens_k).tolist()]
    if len(cq) != len(ck) or len(cq) < 2:
        raise ValueError(f"cu_seqlens_q/cu_seqlens_k must both be [R+1] with R >= 1, got {len(cq)} and {len(ck)}")
    if cq[0] != 0 or ck[0] != 0 or cq[-1] > t_total or ck[-1] > n_total:
        raise ValueError("cu_seqlens must start at 0 and end within the q / k token counts")
    for r in range(len(cq) - 1):
        tq, n = cq[r + 1] - cq[r], ck[r + 1] - ck[r]
        if not 1 <= tq <= n:
            raise ValueError(f"request {r}: need 1 <= query length ({tq}) <= key length ({n})")
        yield cq[r], cq[r + 1], ck[r], ck[r + 1]


# --------------------------------------------------------------------------- 1. scoring


def antidiagonal_block_scores(
    q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *, stride: int, block_size: int
) -> list[Tensor]:
    """Per request, the estimated attention mass A [Hq, n_qb, n_kb] (float32).

    Row ``r`` is absolute query block ``qb0 + r`` with ``qb0 = ctx // block_size``;
    column j is key block j (``n_kb = cdiv(N, block_size)``). A row sums to the
    number of super-rows (stride-aligned query groups) present in that block.
    """
    hq, hkv, g = _check_qkv(q, k)
    _check_blocking(stride, block_size)
    S, B = stride, block_size
    R = B // S  # super-tokens per block
    D = q.shape[2]
    scale = 1.0 / (math.sqrt(D) * S)  # 1/sqrt(D) of attention, 1/S averages the S products
    dev = q.device
    out = []
    for qs, qe, ks, ke in _requests(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        tq, n = qe - qs, ke - ks
        ctx = n - tq
        a0, a1 = ctx // S, (n - 1) // S  # present super-rows (absolute)
        n_sr, n_sc = a1 - a0 + 1, a1 + 1  # super-columns 0..a1 cover every key

        # Queries of positions [a0*S, (a1+1)*S); positions outside [ctx, N) are zero.
        qp = torch.zeros(n_sr * S, hq, D, dtype=torch.float32, device=dev)
        qp[ctx - a0 * S : ctx - a0 * S + tq] = q[qs:qe].float()
        # Reverse within each super-row so that Q~[a, t] = Q[a*S + S-1-t]: then one dot
        # product of flattened [S*D] rows sums exactly the antidiagonal of the S x S tile.
        qt = qp.view(n_sr, S, hq, D).flip(1).permute(2, 0, 1, 3).reshape(hkv, g, n_sr, S * D)
        kp = torch.zeros(n_sc * S, hkv, D, dtype=torch.float32, device=dev)
        kp[:n] = k[ks:ke].float()
        kt = kp.view(n_sc, S, hkv, D).permute(2, 0, 1, 3).reshape(hkv, 1, n_sc, S * D)
        # GQA: the G query heads of a kv head share its K~ via broadcasting (no repeat).
        s = torch.matmul(qt, kt.transpose(-1, -2)).reshape(hq, n_sr, n_sc) * scale

        a_idx = torch.arange(a0, a1 + 1, device=dev)
        b_idx = torch.arange(n_sc, device=dev)
        s = s.masked_fill(b_idx[None, :] > a_idx[:, None], float("-inf"))  # causal, super-token level
        p = torch.softmax(s, dim=-1)

        # Pool into blocks: super-token a lies in block a // R. Zero-pad the probabilities
        # so the present super-rows/cols tile whole blocks, then sum each R x R tile.
        qb0, n_kb = ctx // B, _cdiv(n, B)
        n_qb = (n - 1) // B - qb0 + 1
        p = F.pad(p, (0, n_kb * R - n_sc, a0 - qb0 * R, (qb0 + n_qb) * R - (a1 + 1)))
        out.append(p.view(hq, n_qb, R, n_kb, R).sum(dim=(2, 4)))
    return out


# --------------------------------------------------------------------------- 2. selection


def _per_head_tau(threshold, hq: int) -> Tensor:
    if isinstance(threshold, Tensor):
        tau = threshold.detach().to("cpu", torch.float32).reshape(-1)
        if tau.numel() != hq:
            raise ValueError(f"threshold tensor must have shape [{hq}] (one per query head), got {tuple(threshold.shape)}")
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        tau = torch.full((hq,), float(threshold))
    else:
        raise ValueError(f"threshold must be a float or a float tensor [Hq], got {type(threshold).__name__}")
    if not bool(torch.isfinite(tau).all()) or bool((tau < 0).any()):
        raise ValueError(f"threshold values must be finite and >= 0, got {tau.tolist()}")
    return tau


def _select(A: Tensor, mode: str, tau: Tensor, topk: int | None, ratio: float | None) -> Tensor:
    """Selection for one request on scores A [H, n_qb, n_kb]; tau [H] (threshold mode)."""
    H, n_qb, n_kb = A.shape
    dev = A.device
    i = torch.arange(n_kb - n_qb, n_kb, device=dev)[:, None]  # absolute query block per row
    j = torch.arange(n_kb, device=dev)[None, :]
    cand = j <= i
    forced = (j == 0) | (j == i)  # sink + diagonal; block 0 counted once when i == 0
    other = cand & ~forced

    # Rank the optional candidates: descending A, ties by lower j (stable sort keeps
    # index order among equal keys); non-optional entries (+inf key) sort last.
    key = torch.where(other, -A, torch.full_like(A, float("inf")))
    order = torch.sort(key, dim=-1, stable=True).indices
    vals = torch.gather(torch.where(other, A, torch.zeros_like(A)), -1, order)
    rank = torch.arange(n_kb, device=dev)
    n_other = other.sum(-1, keepdim=True)  # [n_qb, 1]

    if mode == "threshold":
        total = torch.where(cand, A, 0.0).sum(-1, keepdim=True)
        mass = torch.where(forced, A, 0.0).sum(-1, keepdim=True)
        # before[..., r] = mass accumulated before considering the r-th ranked block; it
        # never decreases, so "stop once mass >= tau*total" == "keep while before < target".
        before = torch.cat([mass, vals], dim=-1).cumsum(-1)[..., :-1]
        target = tau.to(dev)[:, None, None] * total
        keep_sorted = before < target
        dense = (tau >= 1.0).to(dev)[:, None, None]
        keep_sorted = (keep_sorted | dense) & (rank < n_other)
    else:
        k_row = (
            torch.full_like(i, topk)
            if mode == "topk"
            else torch.ceil(ratio * (i + 1).double()).long()  # float64 like Python's math.ceil
        )
        n_forced = torch.where(i == 0, 1, 2)
        n_extra = k_row.clamp(min=n_forced, max=i + 1) - n_forced  # never exceeds n_other
        keep_sorted = (rank < n_extra).expand(H, n_qb, n_kb)

    keep = torch.zeros(H, n_qb, n_kb, dtype=torch.bool, device=dev).scatter(-1, order, keep_sorted)
    return keep | forced


def select_blocks(
    scores: Sequence[Tensor],
    *,
    mode: str = "threshold",
    threshold: float | Tensor = 0.9,
    topk: int | None = None,
    ratio: float | None = None,
    granularity: str = "head",
    num_kv_heads: int | None = None,
) -> list[Tensor]:
    """Per request, a bool mask [Hq, n_qb, n_kb] of the key blocks each query block attends.

    - ``threshold``: per row keep forced blocks (sink, diagonal) then the highest-mass
      blocks until the kept mass reaches ``tau * row_total`` (tau >= 1: dense).
      ``threshold`` may be a float or a per-query-head tensor [Hq].
    - ``topk``: forced blocks plus the best others up to ``topk`` blocks per row.
    - ``ratio``: like topk with ``k = ceil(ratio * (i + 1))`` for query block i.
    - ``granularity="kv_group"``: select once per kv head on the scores summed over its
      G query heads (tau: max over the group) and share the mask with those heads.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if mode == "topk" and (not isinstance(topk, int) or isinstance(topk, bool) or topk < 1):
        raise ValueError(f"topk must be an int >= 1 when mode='topk', got {topk!r}")
    if mode == "ratio" and (
        not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < float(ratio) <= 1.0
    ):
        raise ValueError(f"ratio must be a float in (0, 1] when mode='ratio', got {ratio!r}")
    scores = list(scores)
    if not scores or any(A.dim() != 3 or A.shape[1] > A.shape[2] for A in scores):
        raise ValueError("scores must be a non-empty list of [Hq, n_qb, n_kb] tensors with n_qb <= n_kb")
    hq = scores[0].shape[0]
    if any(A.shape[0] != hq for A in scores):
        raise ValueError("all score tensors must have the same number of heads")
    g = 1
    if granularity == "kv_group":
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or hq % num_kv_heads:
            raise ValueError(
                f"granularity='kv_group' needs num_kv_heads, a positive divisor of Hq={hq}; got {num_kv_heads!r}"
            )
        g = hq // num_kv_heads
    tau = _per_head_tau(threshold, hq) if mode == "threshold" else torch.ones(hq)

    masks = []
    for A in scores:
        A = A.float()
        if g > 1:
            _, n_qb, n_kb = A.shape
            m = _select(A.view(-1, g, n_qb, n_kb).sum(1), mode, tau.view(-1, g).amax(1), topk, ratio)
            m = m.repeat_interleave(g, dim=0)
        else:
            m = _select(A, mode, tau, topk, ratio)
        masks.append(m)
    return masks


def density(masks: Sequence[Tensor]) -> float:
    """Selected blocks / causal candidate blocks, over all requests, heads and rows."""
    selected, candidates = 0, 0
    for m in masks:
        h, n_qb, n_kb = m.shape
        i = torch.arange(n_kb - n_qb, n_kb)
        selected += int(m.sum())
        candidates += h * int((i + 1).sum())
    if candidates == 0:
        raise ValueError("density() needs at least one mask")
    return selected / candidates


# --------------------------------------------------------------------------- 3. attention


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    masks: Sequence[Tensor],
    *,
    block_size: int,
    scale: float | None = None,
) -> Tensor:
    """Exact softmax attention where query position p (head h) sees key s iff
    ``s <= p`` and ``masks[r][h, p//B - qb0, s//B]``. Returns [T_total, Hq, D] in q.dtype.

    A query row with no visible key (only possible with a hand-made mask lacking the
    diagonal) outputs zeros; rows of q outside every request are zero too.
    """
    hq, hkv, g = _check_qkv(q, k, v)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    B = block_size
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    out = torch.zeros_like(q)
    dev = q.device
    reqs = list(_requests(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]))
    if len(masks) != len(reqs):
        raise ValueError(f"masks must hold one tensor per request ({len(reqs)}), got {len(masks)}")
    for (qs, qe, ks, ke), m in zip(reqs, masks):
        tq, n = qe - qs, ke - ks
        ctx = n - tq
        qb0, n_kb = ctx // B, _cdiv(n, B)
        shape = (hq, (n - 1) // B - qb0 + 1, n_kb)
        if tuple(m.shape) != shape:
            raise ValueError(f"mask shape must be {shape} for this request, got {tuple(m.shape)}")
        pos_q = torch.arange(ctx, n, device=dev)
        pos_k = torch.arange(n, device=dev)
        m = m.to(device=dev, dtype=torch.bool)
        allowed = m[:, pos_q // B - qb0][:, :, pos_k // B] & (pos_k[None, :] <= pos_q[:, None])  # [Hq, Tq, N]

        kr = k[ks:ke].float().repeat_interleave(g, dim=1)  # [N, Hq, D]; fine for a reference
        vr = v[ks:ke].float().repeat_interleave(g, dim=1)
        s = torch.einsum("thd,nhd->htn", q[qs:qe].float(), kr) * scale
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        out[qs:qe] = torch.einsum("htn,nhd->thd", p, vr).to(q.dtype)
    return out


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, scale: float | None = None
) -> Tensor:
    """Dense causal attention, bottom-right aligned (query j of a request sits at ctx + j)."""
    B = 128  # any block size works with all-True masks
    masks = []
    for qs, qe, ks, ke in _requests(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        n, ctx = ke - ks, (ke - ks) - (qe - qs)
        masks.append(torch.ones(q.shape[1], (n - 1) // B - ctx // B + 1, _cdiv(n, B), dtype=torch.bool))
    return block_sparse_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, masks, block_size=B, scale=scale)


def xattention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    stride: int = 8,
    block_size: int = 128,
    **selection_kwargs,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Score -> select -> attend. ``selection_kwargs`` go to ``select_blocks``
    (``num_kv_heads`` defaults to k's head count). Returns (out, masks, scores)."""
    scores = antidiagonal_block_scores(q, k, cu_seqlens_q, cu_seqlens_k, stride=stride, block_size=block_size)
    selection_kwargs.setdefault("num_kv_heads", k.shape[1])
    masks = select_blocks(scores, **selection_kwargs)
    out = block_sparse_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, masks, block_size=block_size)
    return out, masks, scores
