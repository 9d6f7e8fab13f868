"""Antidiagonal block scoring (XAttention step 1) straight from vLLM's paged KV cache.

Scoring is causal attention on super-tokens with head dim S*D (DESIGN.md section 7):
``Q~[a] = concat_t Q[a*S + S-1-t]``, ``K~[b] = concat_t K[b*S + t]``. A persistent program
takes work items (request, query head, BLOCK_M super-rows = whole query blocks), sweeps key
tiles of BLOCK_N super-columns (whole key blocks) up to the causal limit, and keeps an online
softmax per super-row. Single pass: per key tile it stores the per-(super-row, key block)
probability sums taken at the running max of that moment, plus that max, into a small
per-program scratch; after the sweep it rescales them by exp2(m_then - m_final) / l_final and
sums the rows of each query block into A. Scores are never recomputed nor written to HBM.

On Hopper the GEMM of a whole tile (every row's S tokens inside the request, every key below N)
reads both operands through TMA: the query as 2-D rows of S tokens (a tile's Q_t rows, S tokens
apart, are one box), the keys likewise from token-major keys: for a request without context the
layer's own new keys (``keys``, what vLLM hands the attention layer), else a contiguous copy of
the cache (``key_copy.py``; a paged 16-token page holds one or two rows of a key box, too few
for TMA); ``tma_key_source`` picks one source per launch. That loop issues 97
instructions per 64-wide chunk where the masked pointer loop issues 167 at S=8
(``scripts/sass_loop.py``); with the copy included, scoring took 8-14 % less GPU time at S=8
and -5 to +2 % at S=16 on the H100 (``benchmarks/results/scoring_launch_overhead_h100.json``),
so the plan copies keys only from ``key_copy_min_len``; the layer's own keys cost no copy (a
32K prompt's pipeline: 0.086 -> 0.082 of dense FA3 at S=8, 0.050 -> 0.047 at S=16,
``benchmarks/results/scoring_h100.json``). The tiles at a request's edges keep the masked loads
from the paged cache.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from .key_copy import copy_keys, tma_device
from .plan import XAttnPlan

Tensor = torch.Tensor
_LOG2E = 1.4426950408889634


@triton.jit
def _masked_tile_gemm(acc, q_rows, k_cols, k_base, bt_row, rows, cols, ctx, n, offs_d,
                      s_qt, s_qd, s_kp, s_kn, s_kd,
                      S: tl.constexpr, ND: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                      PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += Q_t @ K_t^T over (t, D chunk) with masked loads of q and of the paged keys: the
    tiles at a request's edges, and every tile where the whole-tile TMA path is off."""
    for it in range(0, S * ND):
        t = it // ND
        d = (it % ND) * BLOCK_D + offs_d
        qpos = rows * S + (S - 1 - t)
        qmask = (qpos >= ctx) & (qpos < n)  # context rows and the tail are zeros
        q = tl.load(q_rows[:, None] - t * s_qt + d[None, :] * s_qd, mask=qmask[:, None], other=0.0)
        kpos = cols * S + t
        kmask = kpos < n
        if PAGE % S == 0:
            k_ptrs = k_cols + t * s_kn
        else:
            page_t = tl.load(bt_row + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
            k_ptrs = k_base + page_t * s_kp + (kpos % PAGE) * s_kn
        k = tl.load(k_ptrs[None, :] + d[:, None] * s_kd, mask=kmask[None, :], other=0.0)  # K_t^T
        if UPCAST:  # the interpreter's bf16 dot is broken; fp32 there is exact anyway
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, k.to(q.dtype), acc, input_precision=PREC)
    return acc


# Per-step ints (work count, key-tile bound, descriptor rows) are not specialised on, so a new batch shape
# never triggers a recompile mid-serving; nor is the block table's row stride (vLLM's table
# width), so the warm-up's own table compiles the same kernel (backends/warmup.py).
@triton.jit(do_not_specialize=["n_work", "max_kt", "s_bt", "q_rows_s", "k_rows_s"])
def _score_kernel(
    q_ptr, kv_ptr, kc_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, koff_ptr, queue_ptr,
    n_work, num_q_heads, group,
    s_qt, s_qh, s_qd,
    s_kp, s_kh, s_kn, s_kd,
    s_bt,
    s_ah, s_ar,
    max_kt, qk_scale, q_rows_s, k_rows_s, s_ct, s_ch,
    S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, B: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    BPS: tl.constexpr = B // S  # super-tokens per block
    NB_T: tl.constexpr = BLOCK_N // BPS  # key blocks per key tile
    QB_T: tl.constexpr = BLOCK_M // BPS  # query blocks per work tile
    ND: tl.constexpr = D // BLOCK_D
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_nb = tl.arange(0, NB_T)
    # This program's private scratch: [max_kt, BLOCK_M, NB_T] partial sums, [max_kt, BLOCK_M] maxima.
    scr_p = scr_p_ptr + pid.to(tl.int64) * max_kt * (BLOCK_M * NB_T)
    scr_m = scr_m_ptr + pid.to(tl.int64) * max_kt * BLOCK_M
    p_offs = offs_m[:, None] * NB_T + offs_nb[None, :]
    if TMA:
        # The query and the keys (the key copy, or the step's own keys: token stride s_ct, head
        # stride s_ch) seen as 2-D rows of S tokens: box [rows, BLOCK_D] at (token // S,
        # (token % S) * token stride + column). Made on the device, so the launch passes plain
        # pointers, and the loop issues 97 instructions per chunk at S=8 against 110 with
        # host-made descriptors (sass_loop.py). The last row may reach past the tensor; only
        # whole tiles read through them, and all their tokens lie inside.
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[q_rows_s, S * s_qt], strides=[S * s_qt, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(kc_ptr, shape=[k_rows_s, S * s_ct], strides=[S * s_ct, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])

    # Work items come longest first from a shared counter: a program takes the next one when
    # it finishes its last, so the makespan stays near the mean (a static round-robin split
    # left some programs 40 % more causal key tiles than others).
    w = tl.atomic_add(queue_ptr, 1)
    while w < n_work:
        tile = w // num_q_heads  # heads innermost: neighbours share K in L2
        h = w % num_q_heads
        r = tl.load(tiles_ptr + 2 * tile)
        a0 = tl.load(tiles_ptr + 2 * tile + 1)
        q_start = tl.load(req_ptr + 5 * r)
        ctx = tl.load(req_ptr + 5 * r + 1)
        n = tl.load(req_ptr + 5 * r + 2)
        qb0 = tl.load(req_ptr + 5 * r + 3)
        qb_off = tl.load(req_ptr + 5 * r + 4)
        hk = h // group
        rows = a0 + offs_m  # absolute super-rows
        if TMA:
            k0 = tl.load(koff_ptr + r)  # the request's first row in the keys read by TMA; -1: none
            q_whole = (k0 >= 0) & (a0 * S >= ctx) & ((a0 + BLOCK_M) * S <= n)
            q_tok = q_start - ctx + a0 * S + (S - 1)  # token of Q_0's first row
        a_last = (n - 1) // S
        n_kt = tl.minimum(a0 + BLOCK_M - 1, a_last) // BLOCK_N + 1
        q_base = q_ptr + h.to(tl.int64) * s_qh
        k_base = kv_ptr + hk.to(tl.int64) * s_kh
        bt_row = bt_ptr + r.to(tl.int64) * s_bt

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        # Row pointers of Q[a*S + S-1] (t = 0); Q_t rows are t tokens earlier.
        q_rows = q_base + (q_start + rows * S + (S - 1) - ctx).to(tl.int64) * s_qt
        if PAGE % S == 0:  # a super-column lies in one page: look the pages up once per key tile
            # Each key tile loads the next one's page ids before its GEMM, so the page-table
            # lookup is not on the critical path of the next tile's first K loads.
            kpos_next = offs_n * S
            page_next = tl.load(bt_row + kpos_next // PAGE, mask=kpos_next < n, other=0)
        for kt in range(0, n_kt):
            cols = kt * BLOCK_N + offs_n
            k_cols = k_base + offs_n * 0  # per-offset page lookups (PAGE % S != 0) do not use it
            if PAGE % S == 0:
                kpos0 = cols * S
                k_cols = k_base + page_next.to(tl.int64) * s_kp + (kpos0 % PAGE) * s_kn
                kpos_next = kpos0 + BLOCK_N * S
                page_next = tl.load(bt_row + kpos_next // PAGE, mask=kpos_next < n, other=0)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if TMA:
                if q_whole & ((kt * BLOCK_N + BLOCK_N) * S <= n):
                    # Q_t's rows are tokens q_tok - t + i*S: row (tok // S) + i of the query seen
                    # as rows of S tokens, at column (tok % S) * token stride; K_t's likewise in
                    # the TMA keys.
                    k_tok = k0 + kt * BLOCK_N * S
                    for it in range(0, S * ND):
                        t = it // ND
                        dc = (it % ND) * BLOCK_D
                        tok = q_tok - t
                        q = q_desc.load([tok // S, (tok % S) * s_qt + h * s_qh + dc])
                        k = k_desc.load([(k_tok + t) // S, ((k_tok + t) % S) * s_ct + hk * s_ch + dc]).T
                        if UPCAST:
                            q = q.to(tl.float32)
                            k = k.to(tl.float32)
                        acc = tl.dot(q, k.to(q.dtype), acc, input_precision=PREC)
                else:
                    acc = _masked_tile_gemm(acc, q_rows, k_cols, k_base, bt_row, rows, cols, ctx, n, offs_d,
                                            s_qt, s_qd, s_kp, s_kn, s_kd, S, ND, BLOCK_D, PAGE, PREC, UPCAST)
            else:
                acc = _masked_tile_gemm(acc, q_rows, k_cols, k_base, bt_row, rows, cols, ctx, n, offs_d,
                                        s_qt, s_qd, s_kp, s_kn, s_kd, S, ND, BLOCK_D, PAGE, PREC, UPCAST)
            if kt * BLOCK_N + BLOCK_N - 1 > a0:  # only tiles that cross the diagonal need the causal mask
                acc = tl.where(cols[None, :] <= rows[:, None], acc, float("-inf"))
            # The scale is applied inside the exponent (one FMA per score; qk_scale > 0 keeps
            # the max), and the row sum comes from the per-block sums: fewer instructions,
            # though not measurably faster (benchmarks/results/scoring_probe6_h100.json).
            # Tile 0 holds super-column 0, visible to every row: m_i is finite from then on.
            m_new = tl.maximum(m_i, tl.max(acc, 1) * qk_scale)
            p = tl.exp2(acc * qk_scale - m_new[:, None])
            psum = tl.sum(tl.reshape(p, (BLOCK_M, NB_T, BPS)), 2)  # per (row, key block), at m_new
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(psum, 1)
            m_i = m_new
            tl.store(scr_p + kt * (BLOCK_M * NB_T) + p_offs, psum)
            tl.store(scr_m + kt * BLOCK_M + offs_m, m_new)
        tl.debug_barrier()  # scratch written by other threads of this program

        # Rescale to the final (m, l) and pool rows into query blocks. Only present
        # super-rows count: ctx//S <= a <= (N-1)//S.
        row_ok = (rows >= ctx // S) & (rows <= a_last)
        inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)
        blk0 = a0 // BPS
        qblk = blk0 + tl.arange(0, QB_T)
        out_rows = qb_off + qblk - qb0
        a_rows = a_ptr + h.to(tl.int64) * s_ah + out_rows.to(tl.int64)[:, None] * s_ar
        rmask = qblk <= (n - 1) // B
        n_kb = (n - 1) // B + 1
        for kt in range(0, n_kt):
            psum = tl.load(scr_p + kt * (BLOCK_M * NB_T) + p_offs)
            m_t = tl.load(scr_m + kt * BLOCK_M + offs_m)
            wgt = tl.exp2(m_t - m_i) * inv_l
            blk = tl.sum(tl.reshape(psum * wgt[:, None], (QB_T, BPS, NB_T)), 1)
            jcols = kt * NB_T + offs_nb
            tl.store(a_rows + jcols[None, :], blk, mask=rmask[:, None] & (jcols < n_kb)[None, :])
        tl.debug_barrier()  # before the next work item overwrites the scratch
        w = tl.atomic_add(queue_ptr, 1)


def scoring_qk_scale(head_dim: int, stride: int) -> float:
    """The kernels' score scale in base 2: the reference's softmax of Q~K~^T / (sqrt(D) * S),
    taken with exp2 (log2(e) folded in)."""
    return _LOG2E / (math.sqrt(head_dim) * stride)


def scoring_workspace_numel(plan: XAttnPlan, num_programs: int) -> int:
    """float32 scratch elements: per program and key tile, BLOCK_M row maxima plus
    BLOCK_M x (key blocks per tile) partial sums, and one element for the work counter.
    Independent of the number of heads."""
    nb_t = plan.block_n // (plan.block_size // plan.stride)
    return num_programs * plan.max_key_tiles * plan.block_m * (1 + nb_t) + 1


_SM_COUNT: dict[int, int] = {}
_STAGE_SMEM = 200 * 1024  # of the H100's 227 KB per block, leaving room for the epilogue's reductions


def _default_warps(tile_elems: int) -> int:
    # the float32 accumulator tile at <= 128 registers per thread
    return 16 if tile_elems > 128 * 256 else 8 if tile_elems >= 128 * 64 else 4


def _default_stages(block_m: int, block_n: int, block_d: int, elem_size: int) -> int:
    """Pipeline depth: 4 (what the default 128 x 256 tile fits), fewer for tiles whose Q and K
    chunks would not fit shared memory at that depth."""
    per_stage = (block_m + block_n) * block_d * elem_size
    return max(2, min(4, _STAGE_SMEM // per_stage))


def scoring_programs(device) -> int:
    """Persistent programs of the scoring kernel: one per SM. Its tiles keep one program
    resident per SM (128 x 256 tile: 255 registers x 256 threads, 192 KB shared memory; only the
    16-row tile fits two), so more programs only wait for the queue to run dry: on the H100, 132
    programs ran 1-4 % faster than 264 (benchmarks/results/scoring_probe5_h100.json) and halve
    the scratch. 4 off the GPU (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def check_scoring_inputs(q: Tensor, kv_cache: Tensor, block_table: Tensor, plan: XAttnPlan) -> None:
    """What every scoring kernel needs of its inputs: q [T, Hq, D] against the cache's
    ``(num_pages, Hkv, page_size, 2*D)`` view with Hkv dividing Hq, pages that divide the block,
    and contiguous block-table rows."""
    _, hq, d = q.shape
    _, hkv, page, two_d = kv_cache.shape
    if two_d != 2 * d or hq % hkv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)} vs kv_cache {tuple(kv_cache.shape)}")
    if plan.block_size % page:
        raise ValueError(f"page_size {page} must divide block_size {plan.block_size}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table rows must be contiguous")


def scoring_buffers(plan: XAttnPlan, num_q_heads: int, num_programs: int, device,
                    out: Tensor | None = None, workspace: Tensor | None = None):
    """The scoring kernel's zeroed output A and its views of the workspace: (A, partial-sum
    scratch, row-max scratch, work counter set to 0). Allocates what is not passed."""
    if out is None:
        out = torch.zeros(num_q_heads, plan.total_q_blocks, plan.max_kb, dtype=torch.float32, device=device)
    else:
        out.zero_()
    need = scoring_workspace_numel(plan, num_programs)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=device)
    elif workspace.numel() < need or workspace.dtype != torch.float32:
        raise ValueError(f"workspace must be float32 with >= {need} elements")
    n_m = num_programs * plan.max_key_tiles * plan.block_m
    scr_m, scr_p = workspace[:n_m], workspace[n_m:need - 1]
    queue = workspace[need - 1:need].view(torch.int32)
    queue.zero_()
    return out, scr_p, scr_m, queue


def antidiagonal_scores_paged(
    q: Tensor,
    kv_cache: Tensor,
    block_table: Tensor,
    plan: XAttnPlan,
    *,
    num_programs: int | None = None,
    out: Tensor | None = None,
    workspace: Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_d: int | None = None,
    key_copy: Tensor | None = None,
    tma: bool | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """Block masses A, packed: float32 [Hq, plan.total_q_blocks, plan.max_kb].

    q: [T, Hq, D] (any strides); q[0] is the first query token of the plan's first request. kv_cache: vLLM's logical
    ``(num_pages, Hkv, page_size, 2*D)`` view, any strides; page_size must divide B.
    block_table: int32 [R, max_pages] of the plan's requests (device). plan: ``plan.to(q.device)``.
    Row ``plan.q_block_offset[r] + (i - qb0)`` holds absolute query block i of request r;
    columns j > i (and beyond the request's key blocks) are 0. No host synchronisation.
    num_programs: persistent grid size (default ``scoring_programs``: one per SM). workspace: optional preallocated
    float32 scratch of ``scoring_workspace_numel(plan, num_programs)`` elements.
    key_copy: optional preallocated ``copy_keys`` buffer (``[>= key_copy_rows(plan), Hkv * D]``).
    keys: optional [T, Hkv, D] keys of q's own tokens (the layer's new keys, row i = token i; any
    token and head strides): the whole tiles of requests with no context read them through TMA,
    with no copy (``direct_keys_usable``).
    tma: whole tiles through TMA, from the keys that ``tma_key_source`` picks (None: where they
    are in TMA boxes; False: masked loads only; True: also without, for the warm-up).
    """
    check_scoring_inputs(q, kv_cache, block_table, plan)
    _, hq, d = q.shape
    hkv = kv_cache.shape[1]
    B, S, page = plan.block_size, plan.stride, kv_cache.shape[2]
    if block_d is None:
        # largest power-of-two chunk of D up to 64: small chunks leave room for 4 stages
        block_d = d & -d if d % 64 else 64
    elif d % block_d:
        raise ValueError(f"block_d {block_d} must divide head_dim {d}")
    if block_d < 16:
        raise ValueError(f"head_dim {d} must be a multiple of 16")
    n_work = plan.num_tiles * hq
    nprog = num_programs or max(1, min(n_work, scoring_programs(q.device)))
    out, scr_p, scr_m, queue = scoring_buffers(plan, hq, nprog, q.device, out, workspace)
    source = tma_key_source(q, kv_cache, plan, keys, tma)
    if source == "direct":
        tma_keys, key_offset = keys, plan.direct_key_offset
    elif source == "copy":
        tma_keys = copy_keys(kv_cache, block_table, plan, out=key_copy).view(-1, hkv, d)
        key_offset = plan.key_offset
    else:
        tma_keys, key_offset = q, plan.key_offset  # unused
    tma = source is not None
    kw = {"num_warps": num_warps or _default_warps(plan.block_m * plan.block_n),
          "num_stages": num_stages or _default_stages(plan.block_m, plan.block_n, block_d, q.element_size())}
    # only the TMA variant makes descriptors; the masked one needs no allocator
    with _descriptor_scratch(q.device) if tma else contextlib.nullcontext():
        _score_kernel[(nprog,)](
            q, kv_cache, tma_keys, block_table, out, scr_p, scr_m, plan.tiles, plan.req_meta,
            key_offset, queue,
            n_work, hq, hq // hkv,
            q.stride(0), q.stride(1), q.stride(2),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            block_table.stride(0),
            out.stride(0), out.stride(1),
            plan.max_key_tiles, scoring_qk_scale(d, S), -(-q.shape[0] // S), -(-tma_keys.shape[0] // S),
            tma_keys.stride(0), tma_keys.stride(1),
            S=S, D=d, BLOCK_D=block_d, B=B, PAGE=page,
            BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
            PREC="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=os.environ.get("TRITON_INTERPRET") == "1" and q.dtype == torch.bfloat16,
            TMA=tma, **kw,
        )
    return out


def tma_key_source(q: Tensor, kv_cache: Tensor, plan: XAttnPlan, keys: Tensor | None,
                   tma: bool | None = None) -> str | None:
    """Which keys scoring's whole tiles read through TMA: ``"copy"`` (the plan copies keys; one
    key source per launch), ``"direct"`` (``keys``, for the requests without context), or None
    (masked loads only: ``tma`` False, no ``tma_supported``, or, by default, neither source).
    ``tma`` True runs the TMA variant even with neither (the warm-up compiles it so), as "copy"."""
    if tma is False or not tma_supported(q, kv_cache):
        return None
    if plan.key_copy_rows > 0:
        return "copy"
    if direct_keys_usable(keys, q, plan):
        return "direct"
    return "copy" if tma else None


def direct_keys_usable(keys: Tensor | None, q: Tensor, plan: XAttnPlan) -> bool:
    """Whether scoring's TMA loads can read ``keys`` (q's tokens' own keys) instead of a copy of the
    cache: some request of the plan has no context and a whole tile (``plan.direct_key_requests``),
    and ``keys`` is [T, Hkv, D] like q's rows, in q's dtype, with a contiguous head dim and 16-byte
    aligned base and strides (TMA's rules)."""
    if keys is None or plan.direct_key_requests == 0:
        return False
    if keys.dim() != 3 or keys.shape[0] != q.shape[0] or keys.shape[2] != q.shape[2] or keys.dtype != q.dtype:
        return False
    size = keys.element_size()
    return (keys.stride(2) == 1 and keys.data_ptr() % 16 == 0
            and (keys.stride(0) * size) % 16 == 0 and (keys.stride(1) * size) % 16 == 0)


def tma_supported(q: Tensor, kv_cache: Tensor) -> bool:
    """Whether the scoring kernel's whole tiles can read through TMA: a GPU and dtype that
    ``tma_device`` accepts, the cache in q's dtype, and a token-major query whose base and token
    stride are 16-byte aligned."""
    if q.stride(2) != 1 or q.stride(1) * (q.shape[1] - 1) + q.shape[2] > q.stride(0):
        return False
    if (q.data_ptr() % 16 or (q.stride(0) * q.element_size()) % 16
            or (kv_cache.shape[1] * kv_cache.shape[3] // 2 * kv_cache.element_size()) % 16):
        return False
    return kv_cache.dtype == q.dtype and tma_device(q.device, q.dtype)


_DESC_SCRATCH: dict = {}


@contextlib.contextmanager
def _descriptor_scratch(device):
    """Triton's allocator for the kernel's device-made TMA descriptors (128 bytes each per
    program), set for one launch and then restored: a buffer kept per device, so a launch
    allocates nothing."""
    def alloc(size: int, alignment: int, stream):
        buf = _DESC_SCRATCH.get(device)
        if buf is None or buf.numel() < size + alignment:
            buf = _DESC_SCRATCH[device] = torch.empty(2 * (size + alignment), dtype=torch.int8, device=device)
        return buf[-buf.data_ptr() % alignment:]

    token = _allocation._allocator.set(alloc)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def unpack_scores(a_packed: Tensor, plan: XAttnPlan) -> list[Tensor]:
    """Per-request views [Hq, n_qb, n_kb] of the packed scores (reference layout; tests)."""
    meta = plan.req_meta.cpu().tolist()
    res = []
    for r, (_, ctx, n, qb0, off) in enumerate(meta):
        n_qb, n_kb = (n - 1) // plan.block_size - qb0 + 1, (n - 1) // plan.block_size + 1
        res.append(a_packed[:, off : off + n_qb, :n_kb])
    return res
