"""The GEMM ceiling under the scoring kernel: how fast can one Triton program of the scoring
tile multiply on this GPU, with pointer loads (what ``kernels/scoring.py`` does: Q rows are
strided, K rows come through the page table) or with TMA descriptor loads, next to cuBLAS?

Scoring at stride S is a GEMM with inner dimension S*D (1024 at S=8 on the Llama layer) followed
by a softmax epilogue; its fp32 accumulator tile (128 x 256) is as large as the registers allow,
so each 64-wide step of the inner dimension streams (128 + 256) x 64 bf16 elements into shared
memory for 128 x 256 x 64 multiply-adds. This times plain GEMMs of the 128K / S=8 scoring size
(16384 x 16384 x 1024, bf16, fp32 accumulate) whose epilogue only reduces each tile to row sums
(like scoring, which writes per-block sums, not the score matrix):

    python scripts/bench_gemm_ceiling.py --out benchmarks/results/gemm_ceiling_h100.json

Records: variant, tile, warps, stages, ms, tflops, and cuBLAS (``torch.matmul``, which also
writes the bf16 product) and dense causal FA3 on the 128K Llama layer for scale. ``--heads-only``
times the pointer-load and the TMA GEMM over all 32 query heads / 8 KV heads of the Llama layer at once (as
much data as scoring streams, far more than the L2), in scoring's order (heads innermost) and
one head at a time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, causal_flops, dense_fa3, paged_inputs, write_records  # noqa: E402


@triton.jit
def _gemm_rowsum_ptr(a_ptr, b_ptr, out_ptr, M, N, K, s_am, s_bn, n_tiles_n,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    pm, pn = pid // n_tiles_n, pid % n_tiles_n
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * s_am + (k + rk)[None, :])
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * s_bn + (k + rk)[:, None])
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rm * n_tiles_n + pn, tl.sum(acc, 1))


@triton.jit
def _head_tile(pid, H, n_tiles_m, n_tiles_n, HEADS_INNER: tl.constexpr):
    """(head, query tile, key tile) of program ``pid``: heads innermost, then query tiles, then
    key tiles (the programs resident together hold one query tile per head, as scoring's do);
    else one head at a time."""
    if HEADS_INNER:
        return pid % H, (pid // H) % n_tiles_m, pid // (H * n_tiles_m)
    return pid // (n_tiles_m * n_tiles_n), (pid // n_tiles_n) % n_tiles_m, pid % n_tiles_n


@triton.jit
def _gemm_rowsum_heads(a_ptr, b_ptr, out_ptr, K, H, GROUP, s_ah, s_am, s_bh, s_bn, n_tiles_m, n_tiles_n,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HEADS_INNER: tl.constexpr):
    """The pointer-load GEMM over H query heads (GROUP per KV head) in one launch, programs in
    ``_head_tile``'s order."""
    h, pm, pn = _head_tile(tl.program_id(0), H, n_tiles_m, n_tiles_n, HEADS_INNER)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_base = a_ptr + h.to(tl.int64) * s_ah
    b_base = b_ptr + (h // GROUP).to(tl.int64) * s_bh
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_base + rm[:, None].to(tl.int64) * s_am + (k + rk)[None, :])
        b = tl.load(b_base + rn[None, :].to(tl.int64) * s_bn + (k + rk)[:, None])
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + (h * n_tiles_m * BM + rm) * n_tiles_n + pn, tl.sum(acc, 1))


@triton.jit
def _gemm_rowsum_heads_tma(a_desc, b_desc, out_ptr, K, H, GROUP, M, n_tiles_m, n_tiles_n,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HEADS_INNER: tl.constexpr):
    """``_gemm_rowsum_heads`` with TMA descriptor loads: a is [H*M, K], b [H/GROUP*M, K]. Same
    bytes through L2 per FLOP; fewer instructions per byte than the pointer loads."""
    h, pm, pn = _head_tile(tl.program_id(0), H, n_tiles_m, n_tiles_n, HEADS_INNER)
    a_row = h * M + pm * BM
    b_row = (h // GROUP) * M + pn * BN
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = a_desc.load([a_row, k])
        b = b_desc.load([b_row, k])
        acc = tl.dot(a, b.T, acc)
    rm = pm * BM + tl.arange(0, BM)
    tl.store(out_ptr + (h * n_tiles_m * BM + rm) * n_tiles_n + pn, tl.sum(acc, 1))


def heads_gemm_launchers(a, b, out, BM=128, BN=256, BK=64, warps=8, stages=3) -> dict:
    """{(tma, heads_inner): launch} of the all-heads GEMMs over a [H, M, K] and b [H/GROUP, M, K]
    (row sums into out [H, M, M/BN]), pointer loads first."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (heads, M, K), kv_heads = a.shape, b.shape[0]
    group, ntm, ntn = heads // kv_heads, M // BM, M // BN
    a_desc = TensorDescriptor.from_tensor(a.view(heads * M, K), [BM, BK])
    b_desc = TensorDescriptor.from_tensor(b.view(kv_heads * M, K), [BN, BK])
    grid = (heads * ntm * ntn,)
    kw = dict(BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    fns = {}
    for inner in (True, False):
        fns[False, inner] = lambda inner=inner: _gemm_rowsum_heads[grid](
            a, b, out, K, heads, group, a.stride(0), a.stride(1), b.stride(0), b.stride(1), ntm, ntn,
            HEADS_INNER=inner, **kw)
    for inner in (True, False):
        fns[True, inner] = lambda inner=inner: _gemm_rowsum_heads_tma[grid](
            a_desc, b_desc, out, K, heads, group, M, ntm, ntn, HEADS_INNER=inner, **kw)
    return fns


def time_heads(M, K, heads=32, kv_heads=8, BM=128, BN=256, BK=64, warps=8, stages=3):
    """The same GEMM for every head of the Llama layer (1 GB of query, 256 MB of keys, as much as
    scoring at 128K / S=8 streams): is ~630 TF/s an L2-resident figure?"""
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(heads, M, K, generator=g, device="cuda").to(torch.bfloat16)
    b = torch.randn(kv_heads, M, K, generator=g, device="cuda").to(torch.bfloat16)
    group, ntn = heads // kv_heads, M // BN
    # row sums of A B^T = A (B^T 1): the check without the product
    want = torch.stack([a[h].float() @ b[h // group].float().sum(0) for h in range(heads)])
    out = torch.empty(heads, M, ntn, device="cuda", dtype=torch.float32)
    records = []
    for (tma, inner), fn in heads_gemm_launchers(a, b, out, BM, BN, BK, warps, stages).items():
        out.zero_()
        fn()
        err = ((out.sum(2) - want).norm() / want.norm()).item()
        ms = do_bench(fn, warmup=3, rep=300)
        rec = dict(variant=f"triton {'TMA' if tma else 'pointer'} loads, all heads, "
                   + ("heads innermost" if inner else "one head at a time"),
                   tile=[BM, BN, BK], warps=warps, stages=stages, heads=heads, kv_heads=kv_heads, m=M, n=M, k=K,
                   ms=ms, tflops=2.0 * heads * M * M * K / ms / 1e9, rel_err_row_sums=err)
        records.append(rec)
        print(rec, flush=True)
    return records


@triton.jit
def _gemm_rowsum_tma(a_desc, b_desc, out_ptr, K, n_tiles_n,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    pm, pn = pid // n_tiles_n, pid % n_tiles_n
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = a_desc.load([pm * BM, k])
        b = b_desc.load([pn * BN, k])
        acc = tl.dot(a, b.T, acc)
    rm = pm * BM + tl.arange(0, BM)
    tl.store(out_ptr + rm * n_tiles_n + pn, tl.sum(acc, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gemm_ceiling_h100.json")
    ap.add_argument("--m", type=int, default=16384, help="rows = columns (128K tokens / S=8)")
    ap.add_argument("--k", type=int, default=1024, help="inner dimension S*D (8 x 128)")
    ap.add_argument("--heads-only", action="store_true", help="only the all-heads GEMMs (time_heads)")
    args = ap.parse_args()
    from triton.tools.tensor_descriptor import TensorDescriptor

    if args.heads_only:
        records = time_heads(args.m, args.k)
        write_records(Path(args.out), records, "python scripts/bench_gemm_ceiling.py " + " ".join(sys.argv[1:]))
        return

    M = N = args.m
    K = args.k
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)
    b = torch.randn(N, K, generator=g, device="cuda").to(torch.bfloat16)
    flops = 2.0 * M * N * K
    want = (a.float() @ b.float().T).sum(1)  # row sums, the check
    records = []
    for BM, BN, BK, warps, stages in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                                      (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]:
        ntn = N // BN
        out = torch.empty(M, ntn, device="cuda", dtype=torch.float32)
        grid = ((M // BM) * ntn,)
        variants = {
            "triton pointer loads": lambda: _gemm_rowsum_ptr[grid](
                a, b, out, M, N, K, a.stride(0), b.stride(0), ntn, BM=BM, BN=BN, BK=BK,
                num_warps=warps, num_stages=stages),
            "triton TMA loads": lambda: _gemm_rowsum_tma[grid](
                TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(b, [BN, BK]), out, K, ntn,
                BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages),
        }
        for name, fn in variants.items():
            try:
                out.zero_()
                fn()
                err = ((out.sum(1) - want).norm() / want.norm()).item()
                ms = do_bench(fn, warmup=5, rep=100)
            except Exception as e:  # a tile that does not fit shared memory or registers
                print(f"{name} {BM}x{BN}x{BK} w{warps} s{stages}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rec = dict(variant=name, tile=[BM, BN, BK], warps=warps, stages=stages, m=M, n=N, k=K,
                       ms=ms, tflops=flops / ms / 1e9, rel_err_row_sums=err)
            records.append(rec)
            print(rec, flush=True)
    ms = do_bench(lambda: torch.matmul(a, b.T), warmup=5, rep=100)
    records.append(dict(variant="cuBLAS torch.matmul (writes the bf16 product)", m=M, n=N, k=K, ms=ms,
                        tflops=flops / ms / 1e9))
    print(records[-1], flush=True)
    dims = SHAPES["llama-3.1-8b"]
    n = 131072
    q, kv, bt, cu_q, sl = paged_inputs([n], [n], **dims)
    ms = do_bench(dense_fa3(q, kv, bt, cu_q, sl), warmup=3, rep=200)
    records.append(dict(variant="dense causal FA3, Llama layer, 128K", ms=ms,
                        tflops=causal_flops([n], [n], dims["num_q_heads"], dims["head_dim"]) / ms / 1e9))
    print(records[-1], flush=True)
    write_records(Path(args.out), records, "python scripts/bench_gemm_ceiling.py " + " ".join(sys.argv[1:]))
    print("\n| variant | tile | warps | stages | ms | TF/s |\n|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['variant']} | {r.get('tile', '')} | {r.get('warps', '')} | {r.get('stages', '')} | "
              f"{r['ms']:.3f} | {r['tflops']:.0f} |")


if __name__ == "__main__":
    main()
