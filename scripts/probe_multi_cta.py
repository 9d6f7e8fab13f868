"""Can a Triton kernel share key tiles between SMs on Hopper? (offline, no GPU)

Scoring at S=8 reads each key tile once per program through L2 (README, "Where scoring's time
goes"); the way past that is a thread-block cluster whose CTAs receive one TMA load by
multicast. Triton reaches clusters only through ``num_ctas > 1``, and Gluon's Hopper TMA copy
has no multicast argument. This compiles the plain GEMM of scoring's tile (a 128 x 256 x 64
block, 8 warps, 3 stages, bf16 in, fp32 out; operands through TMA descriptors or pointer
loads) for sm_90a with ``num_ctas`` 1 and 2 (and a 256-row block over 2 CTAs), and records for
each whether it compiles, the wgmma shape each CTA runs and whether its PTX multicasts, plus the
parameters of Gluon's TMA copy:

    python scripts/probe_multi_cta.py --out benchmarks/results/multi_cta_sm90a.json

Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import inspect
import re
import shlex
import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))


@triton.jit
def _gemm_tma(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    acc = tl.zeros([BM, BN], tl.float32)
    for k in tl.range(0, K, BK):
        acc = tl.dot(a_desc.load([pid_m * BM, k]), b_desc.load([pid_n * BN, k]).T, acc)
    rows, cols = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc)


@triton.jit
def _gemm_pointers(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows, cols, ks = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in tl.range(0, K, BK):
        a = tl.load(a_ptr + rows[:, None] * K + (k + ks)[None, :])
        b = tl.load(b_ptr + cols[:, None] * K + (k + ks)[None, :])
        acc = tl.dot(a, b.T, acc)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc)


def compile_case(fn, num_ctas: int, block_m: int) -> dict:
    """Compile ``fn`` for sm_90a with ``num_ctas`` CTAs per cluster and a ``block_m`` x 256 x 64
    block (Triton splits a block over the cluster's CTAs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*fp32", M="i32", N="i32", K="i32",
               BM="constexpr", BN="constexpr", BK="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    rec = dict(kernel=fn.fn.__name__.lstrip("_"), num_ctas=num_ctas, block=[block_m, 256, 64])
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(BM=block_m, BN=256, BK=64), attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=8, num_stages=3, num_ctas=num_ctas))
    except Exception as e:  # the compiler's own failure is the finding
        msg = str(e).strip().splitlines()
        return {**rec, "compiles": False, "error": msg[-1] if msg else type(e).__name__}
    ptx = k.asm["ptx"]
    return {**rec, "compiles": True, "shared_bytes_per_cta": k.metadata.shared,
            "wgmma_shapes": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
            "ptx_multicast": ptx.count(".multicast::cluster"), "ptx_tma_loads": ptx.count("cp.async.bulk.tensor")}


def gluon_tma_copy_params() -> list[str]:
    """Parameters of Gluon's Hopper TMA load (a multicast option would appear here)."""
    from triton.experimental.gluon.language.nvidia.hopper import tma
    return [p for p in inspect.signature(tma.async_copy_global_to_shared).parameters if p != "_semantic"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="results JSON (printed only without)")
    args = ap.parse_args()
    records = [compile_case(fn, n, bm) for fn in (_gemm_tma, _gemm_pointers)
               for n, bm in ((1, 128), (2, 128), (2, 256))]
    gluon = gluon_tma_copy_params()
    for r in records:
        print(r)
    print("gluon hopper tma.async_copy_global_to_shared parameters:", gluon)
    if args.out:
        from bench_common import write_records
        write_records(args.out, records, "python scripts/probe_multi_cta.py " + shlex.join(sys.argv[1:]),
                      device=f"none: compiled offline for sm_90a (Triton {triton.__version__})",
                      gluon_tma_load_parameters=gluon)


if __name__ == "__main__":
    main()
