"""Warp-specialised scoring kernel (Gluon, Hopper): a prototype, not used by the backend.

Same inputs, outputs and scratch as ``kernels/scoring.py``'s ``antidiagonal_scores_paged``
(read that docstring first), different execution: the Triton kernel's 8 warps both compute the
load addresses and run the MMAs, pipelined within one key tile, and stop loading during each
tile's softmax. Here a loader partition (one warpgroup) claims work items from the shared
counter, passes them on through a small shared-memory queue and keeps a ring of Q / K stages
filled with ``cp.async`` across key tiles and work items; the compute partition (two
warpgroups) only waits, issues async wgmma and runs the softmax epilogue and the rescale pass.
Probe 6/7 (README, "Where scoring's time goes") found no cheaper way to hide the loads and the
epilogue in plain Triton.

Two options (2026-11-24): ``pingpong`` splits the compute partition into two 4-warp
partitions, each owning 64 rows of the tile and its own softmax, reading the same ring stages
(FA3's ping-pong without its explicit MMA ordering; ``lag`` starts the second that many stages
behind); ``tma`` loads whole tiles through TMA as the Triton kernel does (edge tiles keep the
cp.async gathers).

Status: right on the H100 in every mode (``tests/test_scoring_ws_prototype.py``'s gpu tests;
each mode also compiles for sm_90a without a GPU: ``python scripts/scoring_ws_prototype.py
--compile 8 128 --pingpong --tma``). Timed next to the Triton kernel (README, "FA3's ping-pong
in Gluon"): with cp.async loads it is slower everywhere; ``pingpong`` + ``tma`` is 2-4 %
faster at S=8 and 5-10 % slower at S=16, so the backend keeps the Triton kernel.

Limits (the wrapper checks them): bf16 / fp16 inputs, head dim a multiple of ``block_d`` (32
or 64; the Llama and Qwen layers: 128 and 64), contiguous head dim in q and the cache, 16-byte aligned
rows, PAGE % S == 0, 128-row work tiles (the default) and key tiles of at most 256.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy, fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from vllm_xattn.kernels.plan import XAttnPlan
from vllm_xattn.kernels import copy_keys
from vllm_xattn.kernels.scoring import (
    check_scoring_inputs, scoring_buffers, scoring_programs, scoring_qk_scale, tma_key_source,
)

Tensor = torch.Tensor
_BLOCK_D = 64  # default chunk: one stage Q [BLOCK_M, 64] + K [BLOCK_N, 64], 48 KB at 128 x 256 (bf16)
QUEUE = gl.constexpr(2)  # work items in flight between the partitions


@gluon.jit
def _loader(q_ptr, kv_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, queue_ptr,
            n_work, num_q_heads, group, s_qt, s_qh, s_kp, s_kh, s_kn, s_bt, s_ah, s_ar, max_kt, qk_scale,
            q_ring, k_ring, ready, empty, wq_smem, wq_ready, wq_empty,
            q_desc, k_desc, koff_ptr, s_ct, s_ch,
            S: gl.constexpr, D: gl.constexpr, B: gl.constexpr, PAGE: gl.constexpr,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_D: gl.constexpr,
            TMA: gl.constexpr):
    # TMA: whole tiles (every row's S tokens inside the request, every key below N) read the
    # query and the keys (``k_desc``: the layer's own keys or a contiguous copy, as the Triton
    # kernel's TMA path) as boxes of rows S tokens apart; the tiles at a request's edges keep the
    # masked cp.async gathers from the paged cache. Either way a stage's ``ready`` barrier
    # completes after 4 x 32 arrivals (and, for TMA, the bytes).
    NW: gl.constexpr = gl.num_warps()
    ND: gl.constexpr = D // BLOCK_D
    # 16-byte vectors along the head dim: BLOCK_D / 8 lanes cover one row chunk
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_D // 8), BLOCK_D // 8], [NW, 1], [1, 0])
    one_l: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    offs_m = gl.arange(0, BLOCK_M, gl.SliceLayout(1, ld_l))
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(1, ld_l))
    offs_d = gl.arange(0, BLOCK_D, gl.SliceLayout(0, ld_l))
    it = 0  # stages filled so far (ring position and phase)
    t = 0  # work items published so far
    w = 0
    while w < n_work:
        w = gl.atomic_add(queue_ptr, 1)  # longest items first (plan order)
        slot = t % QUEUE
        mbarrier.wait(wq_empty.index(slot), ((t // QUEUE) & 1) ^ 1)
        wq_smem.index(slot).store(gl.full([1], w, gl.int32, one_l))
        mbarrier.arrive(wq_ready.index(slot))  # also publishes the end (w >= n_work)
        t += 1
        if w < n_work:
            tile = w // num_q_heads  # heads innermost: neighbours share K in L2
            h = w % num_q_heads
            r = gl.load(tiles_ptr + 2 * tile)
            a0 = gl.load(tiles_ptr + 2 * tile + 1)
            q_start = gl.load(req_ptr + 5 * r)
            ctx = gl.load(req_ptr + 5 * r + 1)
            n = gl.load(req_ptr + 5 * r + 2)
            rows = a0 + offs_m
            n_kt = gl.minimum(a0 + BLOCK_M - 1, (n - 1) // S) // BLOCK_N + 1
            k0 = gl.load(koff_ptr + r)  # the request's first row in the TMA keys; -1: none
            q_whole = TMA & (k0 >= 0) & (a0 * S >= ctx) & ((a0 + BLOCK_M) * S <= n)
            q_tok = q_start - ctx + a0 * S + (S - 1)  # token of Q_0's first row
            # Row pointers of Q[a*S + S-1] (t = 0); Q_t rows are t tokens earlier.
            # (16-byte aligned rows: the wrapper checks the strides; cp.async needs the hint)
            q_rows = gl.multiple_of(q_ptr + h.to(gl.int64) * s_qh
                                    + (q_start + rows * S + (S - 1) - ctx).to(gl.int64) * s_qt, 16)
            k_base = kv_ptr + (h // group).to(gl.int64) * s_kh
            bt_row = bt_ptr + r.to(gl.int64) * s_bt
            for kt in range(n_kt):
                kpos0 = (kt * BLOCK_N + offs_n) * S  # a super-column lies in one page
                page = gl.load(bt_row + kpos0 // PAGE, mask=kpos0 < n, other=0)
                k_cols = gl.multiple_of(k_base + page.to(gl.int64) * s_kp + (kpos0 % PAGE) * s_kn, 16)
                whole = q_whole & ((kt * BLOCK_N + BLOCK_N) * S <= n)
                k_tok = k0 + kt * BLOCK_N * S
                for i in range(S * ND):
                    tt = i // ND
                    d = (i % ND) * BLOCK_D + offs_d
                    s = it % NUM_STAGES
                    mbarrier.wait(empty.index(s), ((it // NUM_STAGES) & 1) ^ 1)
                    if whole:
                        # Q_t's rows are tokens q_tok - t + i*S: row (tok // S) + i of the query
                        # seen as rows of S tokens, at column (tok % S) * token stride; K_t's
                        # likewise in the TMA keys.
                        dc = (i % ND) * BLOCK_D
                        tok = q_tok - tt
                        mbarrier.expect(ready.index(s),
                                        (BLOCK_M + BLOCK_N) * BLOCK_D * q_ring.dtype.primitive_bitwidth // 8)
                        tma.async_copy_global_to_shared(q_desc, [tok // S, (tok % S) * s_qt + h * s_qh + dc],
                                                        ready.index(s), q_ring.index(s))
                        tma.async_copy_global_to_shared(
                            k_desc, [(k_tok + tt) // S, ((k_tok + tt) % S) * s_ct + (h // group) * s_ch + dc],
                            ready.index(s), k_ring.index(s))
                        mbarrier.arrive(ready.index(s), count=4 * 32 - 1)  # the expect arrived once
                    else:
                        qpos = rows * S + (S - 1 - tt)
                        qmask = (qpos >= ctx) & (qpos < n)  # context rows and the tail are zeros
                        async_copy.async_copy_global_to_shared(
                            q_ring.index(s), q_rows[:, None] - tt * s_qt + d[None, :], mask=qmask[:, None])
                        async_copy.async_copy_global_to_shared(
                            k_ring.index(s), k_cols[:, None] + tt * s_kn + d[None, :],
                            mask=(kpos0 + tt < n)[:, None])
                        # every loader thread arrives once its own copies have landed (init count)
                        async_copy.mbarrier_arrive(ready.index(s), increment_count=False)
                    it += 1
    # Stay until the compute partition has released every stage: the last copies are in
    # flight when the end is published, and they must land before these warps exit.
    for j in gl.static_range(NUM_STAGES):
        mbarrier.wait(empty.index((it + j) % NUM_STAGES), (((it + j) // NUM_STAGES) & 1) ^ 1)


@gluon.jit
def _compute(q_ptr, kv_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, queue_ptr,
             n_work, num_q_heads, group, s_qt, s_qh, s_kp, s_kh, s_kn, s_bt, s_ah, s_ar, max_kt, qk_scale,
             q_ring, k_ring, ready, empty, wq_smem, wq_ready, wq_empty, go,
             S: gl.constexpr, D: gl.constexpr, B: gl.constexpr, PAGE: gl.constexpr,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_D: gl.constexpr,
             EPILOGUE: gl.constexpr,
             ROW0: gl.constexpr, ROWS: gl.constexpr, GO: gl.constexpr, LAG: gl.constexpr):
    # Rows [ROW0, ROW0 + ROWS) of each work tile: all 128 in one 8-warp partition, or 64 in each
    # of two 4-warp partitions (ping-pong). GO 1: arrive on ``go`` after LAG chunks; GO 2: wait
    # for it first, so the second partition runs LAG chunks behind the first and each one's
    # softmax can run under the other's MMAs.
    NW: gl.constexpr = gl.num_warps()
    ND: gl.constexpr = D // BLOCK_D
    BPS: gl.constexpr = B // S  # super-tokens per block
    NB_T: gl.constexpr = BLOCK_N // BPS  # key blocks per key tile
    QB_T: gl.constexpr = ROWS // BPS  # query blocks in this partition's rows
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                    instr_shape=[16, BLOCK_N, 16])
    one_l: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    offs_m = gl.arange(0, ROWS, row_l)
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, acc_l))
    # This program's private scratch: [max_kt, BLOCK_M, NB_T] partial sums, [max_kt, BLOCK_M] maxima.
    pid = gl.program_id(0)
    scr_p = scr_p_ptr + pid.to(gl.int64) * max_kt * (BLOCK_M * NB_T)
    scr_m = scr_m_ptr + pid.to(gl.int64) * max_kt * BLOCK_M
    it = 0
    t = 0
    w = 0
    if GO == 2:
        mbarrier.wait(go, 0)
    while w < n_work:
        slot = t % QUEUE
        mbarrier.wait(wq_ready.index(slot), (t // QUEUE) & 1)
        w = gl.max(wq_smem.index(slot).load(one_l), axis=0)
        mbarrier.arrive(wq_empty.index(slot))
        t += 1
        if w < n_work:
            tile = w // num_q_heads
            h = w % num_q_heads
            r = gl.load(tiles_ptr + 2 * tile)
            a0 = gl.load(tiles_ptr + 2 * tile + 1)
            ctx = gl.load(req_ptr + 5 * r + 1)
            n = gl.load(req_ptr + 5 * r + 2)
            qb0 = gl.load(req_ptr + 5 * r + 3)
            qb_off = gl.load(req_ptr + 5 * r + 4)
            rows = a0 + ROW0 + offs_m
            a_last = (n - 1) // S
            n_kt = gl.minimum(a0 + BLOCK_M - 1, a_last) // BLOCK_N + 1
            m_i = gl.full([ROWS], float("-inf"), gl.float32, row_l)
            l_i = gl.zeros([ROWS], gl.float32, row_l)
            for kt in range(n_kt):
                acc = gl.zeros([ROWS, BLOCK_N], gl.float32, acc_l)
                for i in range(S * ND):
                    s = it % NUM_STAGES
                    mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1)
                    fence_async_shared()  # cp.async (generic proxy) writes -> wgmma (async proxy) reads
                    acc = warpgroup_mma(q_ring.index(s).slice(ROW0, ROWS), k_ring.index(s).permute((1, 0)), acc,
                                        use_acc=i > 0, is_async=True)
                    # one MMA in flight: the previous stage's has retired, give it back
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    if i > 0:
                        mbarrier.arrive(empty.index((it - 1) % NUM_STAGES))
                    it += 1
                    if GO == 1:
                        if it == LAG:
                            mbarrier.arrive(go)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty.index((it - 1) % NUM_STAGES))

                if EPILOGUE:
                    # The epilogue of kernels/scoring.py, in the wgmma accumulator's layout.
                    cols = kt * BLOCK_N + offs_n
                    if kt * BLOCK_N + BLOCK_N - 1 > a0:  # only tiles that cross the diagonal
                        acc = gl.where(cols[None, :] <= rows[:, None], acc, float("-inf"))
                    m_new = gl.maximum(m_i, gl.max(acc, 1) * qk_scale)
                    p = gl.exp2(acc * qk_scale - m_new[:, None])
                    psum = gl.sum(gl.reshape(p, [ROWS, NB_T, BPS]), axis=2)  # per (row, key block)
                    red_l: gl.constexpr = psum.type.layout
                    l_i = l_i * gl.exp2(m_i - m_new) + gl.convert_layout(gl.sum(psum, 1), row_l)
                    m_i = m_new
                    pr = ROW0 + gl.arange(0, ROWS, gl.SliceLayout(1, red_l))
                    pc = gl.arange(0, NB_T, gl.SliceLayout(0, red_l))
                    gl.store(scr_p + kt * (BLOCK_M * NB_T) + pr[:, None] * NB_T + pc[None, :], psum)
                    gl.store(scr_m + kt * BLOCK_M + ROW0 + offs_m, m_new)
                else:  # timing only (scores wrong): how fast is the MMA feed alone?
                    l_i = l_i + gl.sum(acc, 1)
            gl.thread_barrier()  # scratch written by other threads of this partition

            # Rescale to the final (m, l) and pool rows into query blocks (as kernels/scoring.py).
            sc_l: gl.constexpr = gl.BlockedLayout([1, 1], [32 // NB_T if NB_T < 32 else 1, NB_T if NB_T < 32 else 32],
                                                  [NW, 1], [1, 0])
            sr = ROW0 + gl.arange(0, ROWS, gl.SliceLayout(1, sc_l))
            sc = gl.arange(0, NB_T, gl.SliceLayout(0, sc_l))
            rows_s = a0 + sr
            row_ok = (rows_s >= ctx // S) & (rows_s <= a_last)
            m_fin = gl.convert_layout(m_i, gl.SliceLayout(1, sc_l))
            inv_l = gl.where(row_ok, 1.0 / gl.convert_layout(l_i, gl.SliceLayout(1, sc_l)), 0.0)
            for kt in range(n_kt):
                ps = gl.load(scr_p + kt * (BLOCK_M * NB_T) + sr[:, None] * NB_T + sc[None, :])
                m_t = gl.load(scr_m + kt * BLOCK_M + sr)
                wgt = gl.exp2(m_t - m_fin) * inv_l
                blk = gl.sum(gl.reshape(ps * wgt[:, None], [QB_T, BPS, NB_T]), axis=1)
                blk_l: gl.constexpr = blk.type.layout
                qblk = (a0 + ROW0) // BPS + gl.arange(0, QB_T, gl.SliceLayout(1, blk_l))
                jcols = kt * NB_T + gl.arange(0, NB_T, gl.SliceLayout(0, blk_l))
                out_rows = qb_off + qblk - qb0
                a_rows = a_ptr + h.to(gl.int64) * s_ah + out_rows.to(gl.int64)[:, None] * s_ar
                ok = (qblk <= (n - 1) // B)[:, None] & (jcols < (n - 1) // B + 1)[None, :]
                gl.store(a_rows + jcols[None, :], blk, mask=ok)
            gl.thread_barrier()  # before the next work item overwrites the scratch
    if GO == 1:
        if it < LAG:  # fewer chunks in all than the lag: release the other partition anyway
            mbarrier.arrive(go)


@gluon.jit
def _score_ws_kernel(q_ptr, kv_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, queue_ptr,
                     n_work, num_q_heads, group, s_qt, s_qh, s_kp, s_kh, s_kn, s_bt, s_ah, s_ar, max_kt, qk_scale,
                     q_desc, k_desc, koff_ptr, s_ct, s_ch,
                     S: gl.constexpr, D: gl.constexpr, B: gl.constexpr, PAGE: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_D: gl.constexpr,
                     LOADER_REGS: gl.constexpr, EPILOGUE: gl.constexpr, PINGPONG: gl.constexpr,
                     COMPUTE_REGS: gl.constexpr, LAG: gl.constexpr, TMA: gl.constexpr):
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_D], dtype)
    k_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], dtype)
    q_ring = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_D], q_sl)
    k_ring = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], k_sl)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    wq_smem = gl.allocate_shared_memory(gl.int32, [QUEUE, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    wq_ready = gl.allocate_shared_memory(gl.int64, [QUEUE, 1], mbarrier.MBarrierLayout())
    wq_empty = gl.allocate_shared_memory(gl.int64, [QUEUE, 1], mbarrier.MBarrierLayout())
    go = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    N_COMPUTE: gl.constexpr = 2 if PINGPONG else 1  # compute partitions
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=4 * 32)  # each loader thread's cp.async arrival
        mbarrier.init(empty.index(i), count=N_COMPUTE)  # one arrival per compute partition
    for i in gl.static_range(QUEUE):
        mbarrier.init(wq_ready.index(i), count=1)
        mbarrier.init(wq_empty.index(i), count=N_COMPUTE)
    mbarrier.init(go, count=1)
    # (the argument tuples are written out: a tuple held in a variable turns the constexprs
    # into tensors)
    if PINGPONG:  # two 64-row compute warpgroups on their own, LAG chunks apart
        gl.warp_specialize([
            (_compute, (q_ptr, kv_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, queue_ptr,
                        n_work, num_q_heads, group, s_qt, s_qh, s_kp, s_kh, s_kn, s_bt, s_ah, s_ar, max_kt,
                        qk_scale, q_ring, k_ring, ready, empty, wq_smem, wq_ready, wq_empty, go,
                        S, D, B, PAGE, BLOCK_M, BLOCK_N, NUM_STAGES, BLOCK_D, EPILOGUE, 0, BLOCK_M // 2,
                        1 if LAG > 0 else 0, LAG)),
            (_compute, (q_ptr, kv_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, queue_ptr,
                        n_work, num_q_heads, group, s_qt, s_qh, s_kp, s_kh, s_kn, s_bt, s_ah, s_ar, max_kt,
                        qk_scale, q_ring, k_ring, ready, empty, wq_smem, wq_ready, wq_empty, go,
                        S, D, B, PAGE, BLOCK_M, BLOCK_N, NUM_STAGES, BLOCK_D, EPILOGUE, BLOCK_M // 2, BLOCK_M // 2,
                        2 if LAG > 0 else 0, LAG)),
            (_loader, (q_ptr, kv_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, queue_ptr,
                       n_work, num_q_heads, group, s_qt, s_qh, s_kp, s_kh, s_kn, s_bt, s_ah, s_ar, max_kt,
                       qk_scale, q_ring, k_ring, ready, empty, wq_smem, wq_ready, wq_empty,
                       q_desc, k_desc, koff_ptr, s_ct, s_ch,
                       S, D, B, PAGE, BLOCK_M, BLOCK_N, NUM_STAGES, BLOCK_D, TMA)),
        ], [4, 4], [COMPUTE_REGS, LOADER_REGS])
    else:
        # (the argument tuples are written out: a tuple held in a variable turns the constexprs
        # into tensors)
        gl.warp_specialize([
            (_compute, (q_ptr, kv_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, queue_ptr,
                        n_work, num_q_heads, group, s_qt, s_qh, s_kp, s_kh, s_kn, s_bt, s_ah, s_ar, max_kt,
                        qk_scale, q_ring, k_ring, ready, empty, wq_smem, wq_ready, wq_empty, go,
                        S, D, B, PAGE, BLOCK_M, BLOCK_N, NUM_STAGES, BLOCK_D, EPILOGUE, 0, BLOCK_M, 0, 0)),
            (_loader, (q_ptr, kv_ptr, bt_ptr, a_ptr, scr_p_ptr, scr_m_ptr, tiles_ptr, req_ptr, queue_ptr,
                       n_work, num_q_heads, group, s_qt, s_qh, s_kp, s_kh, s_kn, s_bt, s_ah, s_ar, max_kt,
                       qk_scale, q_ring, k_ring, ready, empty, wq_smem, wq_ready, wq_empty,
                       q_desc, k_desc, koff_ptr, s_ct, s_ch,
                       S, D, B, PAGE, BLOCK_M, BLOCK_N, NUM_STAGES, BLOCK_D, TMA)),
        ], [4], [LOADER_REGS])


def antidiagonal_scores_paged_ws(
    q: Tensor, kv_cache: Tensor, block_table: Tensor, plan: XAttnPlan, *,
    num_programs: int | None = None, out: Tensor | None = None, workspace: Tensor | None = None,
    num_stages: int = 4, loader_regs: int = 112, epilogue: bool = True,
    pingpong: bool = False, compute_regs: int = 200, lag: int = 2, keys: Tensor | None = None,
    tma: bool = False, block_d: int = _BLOCK_D,
) -> Tensor:
    """``antidiagonal_scores_paged`` through the warp-specialised kernel (same contract).
    ``pingpong``: two 64-row compute warpgroups, each on its own, the second ``lag`` chunks
    behind the first (0: no stagger; below ``num_stages``, since the loader refills a stage only
    once both have read it). ``tma``: whole tiles through TMA as the Triton kernel reads them
    (``keys``: the layer's own keys, see ``antidiagonal_scores_paged``)."""
    check_scoring_inputs(q, kv_cache, block_table, plan)
    _, hq, d = q.shape
    hkv = kv_cache.shape[1]
    B, S, page = plan.block_size, plan.stride, kv_cache.shape[2]
    if q.dtype not in (torch.bfloat16, torch.float16) or kv_cache.dtype != q.dtype:
        raise ValueError(f"bf16 / fp16 only, got {q.dtype} / {kv_cache.dtype}")
    if block_d not in (32, 64) or d % block_d or q.stride(2) != 1 or kv_cache.stride(3) != 1 or page % S:
        raise ValueError("needs block_d 32 or 64 dividing head_dim, a contiguous head dim and page % stride == 0")
    # cp.async moves 16-byte vectors: every row the kernel reads starts 16-byte aligned
    strides = (q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2))
    if any(x % 8 for x in strides) or q.data_ptr() % 16 or kv_cache.data_ptr() % 16:
        raise ValueError(f"needs 16-byte aligned rows: strides {strides}")
    if plan.block_m != 128 or plan.block_n > 256:  # two warpgroups of 64 rows; wgmma N <= 256
        raise ValueError(f"needs block_m 128 and block_n <= 256, got {plan.block_m} / {plan.block_n}")
    if pingpong and not 0 <= lag < num_stages:
        raise ValueError(f"lag {lag} must be in [0, num_stages {num_stages})")
    n_work = plan.num_tiles * hq
    nprog = num_programs or max(1, min(n_work, scoring_programs(q.device)))
    out, scr_p, scr_m, queue = scoring_buffers(plan, hq, nprog, q.device, out, workspace)
    source = tma_key_source(q, kv_cache, plan, keys, tma) if tma else None
    if source == "direct":
        tma_keys, key_offset = keys, plan.direct_key_offset
    elif source == "copy":
        tma_keys, key_offset = copy_keys(kv_cache, block_table, plan).view(-1, hkv, d), plan.key_offset
    else:
        tma_keys, key_offset = q, plan.key_offset  # unused
    q_desc, k_desc = row_descriptors(q, tma_keys, S, plan.block_m, plan.block_n, block_d)
    _score_ws_kernel[(nprog,)](
        q, kv_cache, block_table, out, scr_p, scr_m, plan.tiles, plan.req_meta, queue,
        n_work, hq, hq // hkv, q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1), plan.max_key_tiles, scoring_qk_scale(d, S),
        q_desc, k_desc, key_offset, tma_keys.stride(0), tma_keys.stride(1),
        S=S, D=d, B=B, PAGE=page, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        NUM_STAGES=num_stages, BLOCK_D=block_d, LOADER_REGS=loader_regs, EPILOGUE=epilogue, PINGPONG=pingpong,
        COMPUTE_REGS=compute_regs, LAG=lag, TMA=source is not None, num_warps=4 if pingpong else 8,
    )
    return out


def row_descriptors(q: Tensor, keys: Tensor, stride: int, block_m: int, block_n: int, block_d: int = _BLOCK_D):
    """Host TMA descriptors of the query and the keys seen as 2-D rows of ``stride`` tokens
    (box [block rows, block_d columns]), as the Triton kernel makes them on the device."""
    dt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def rows_of(x: Tensor, block_rows: int) -> TensorDescriptor:
        layout = gl.NVMMASharedLayout.get_default_for([block_rows, block_d], dt)
        return TensorDescriptor(x, [-(-x.shape[0] // stride), stride * x.stride(0)], [stride * x.stride(0), 1],
                                [block_rows, block_d], layout)

    return rows_of(q, block_m), rows_of(keys, block_n)


def compile_report(stride: int, head_dim: int, *, block_size: int = 128, page: int = 16, block_n: int = 256,
                   num_stages: int = 4, loader_regs: int = 112, pingpong: bool = False,
                   compute_regs: int = 200, lag: int = 2, tma: bool = False, block_d: int = _BLOCK_D) -> dict:
    """Compile the kernel for sm_90a without a GPU (Triton's own ptxas) and report what ptxas
    says. Gluon must be imported without TRITON_INTERPRET (its reductions are jit functions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from sass_loop import sm90_signature

    consts = dict(S=stride, D=head_dim, B=block_size, PAGE=page, BLOCK_M=128, BLOCK_N=block_n,
                  NUM_STAGES=num_stages, BLOCK_D=block_d, LOADER_REGS=loader_regs, EPILOGUE=True,
                  PINGPONG=pingpong,
                  COMPUTE_REGS=compute_regs, LAG=lag, TMA=tma)
    # the descriptors' types, from host descriptors of a Llama-shaped query and fused-qkv keys
    q = torch.empty(4096, 32, head_dim, dtype=torch.bfloat16)
    keys = torch.empty(4096, 48, head_dim, dtype=torch.bfloat16)[:, 32:40]
    descs = row_descriptors(q, keys, stride, 128, block_n, block_d)
    sig, attrs = sm90_signature(_score_ws_kernel, consts, types={
        "q_desc": mangle_type(descs[0]), "k_desc": mangle_type(descs[1]), "koff_ptr": "*i32"})
    k = triton.compile(GluonASTSource(fn=_score_ws_kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4 if pingpong else 8))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        ptxas = Path(triton.backends.nvidia.__path__[0]) / "bin" / "ptxas"
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return dict(ptxas_ok=res.returncode == 0, ptxas=res.stderr.strip()[-2000:], num_warps=k.metadata.num_warps,
                shared_bytes=k.metadata.shared, spill_store_bytes=[int(x) for x in spills],
                setmaxnreg=re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", k.asm["ptx"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", nargs=2, type=int, metavar=("STRIDE", "HEAD_DIM"), required=True,
                    help="compile for sm_90a and print ptxas' report as JSON")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=256)
    ap.add_argument("--pingpong", action="store_true", help="two 64-row compute warpgroups, staggered")
    ap.add_argument("--compute-regs", type=int, default=200, help="registers of the second compute warpgroup")
    ap.add_argument("--lag", type=int, default=2)
    ap.add_argument("--tma", action="store_true", help="whole tiles through TMA")
    ap.add_argument("--block-d", type=int, default=_BLOCK_D, help="head-dim columns per load stage (32 or 64)")
    ap.add_argument("--stages", type=int, default=4)
    a = ap.parse_args()
    print(json.dumps(compile_report(*a.compile, block_size=a.block_size, page=a.page, block_n=a.block_n,
                                    num_stages=a.stages, pingpong=a.pingpong, compute_regs=a.compute_regs,
                                    lag=a.lag, tma=a.tma, block_d=a.block_d)))
