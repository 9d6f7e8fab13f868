"""Instructions in the scoring kernel's MMA loop, offline (no GPU): compile for sm_90a with
Triton's own ptxas, disassemble with its nvdisasm, and count the SASS of the innermost loop that
holds the wgmma (HGMMA) instructions, next to the same count for the plain GEMM of the same tile
(``bench_gemm_ceiling.py``). Nsight Compute found the kernel issuing about twice the GEMM's
instructions per FLOP (``ncu_scoring.py``); this shows where, without a GPU:

    python scripts/sass_loop.py --strides 8 16 --variants no-load-masks \\
        --out benchmarks/results/scoring_sass_loop_sm90a.json

Prints one JSON line per kernel: instructions per loop iteration, how many of them are HGMMA /
LDGSTS, and the opcode histogram. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The scoring kernels' pointer parameters (the Triton kernel's and the Gluon prototype's), and the
# strides that are multiples of 16 as serving launches see them (Triton specialises on that).
SCORE_POINTERS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "kc_ptr": "*bf16", "bt_ptr": "*i32", "a_ptr": "*fp32", "scr_p_ptr": "*fp32",
                  "scr_m_ptr": "*fp32", "tiles_ptr": "*i32", "req_ptr": "*i32", "koff_ptr": "*i32",
                  "queue_ptr": "*i32"}
SCORE_ALIGNED = ("s_qt", "s_qh", "s_kp", "s_kh", "s_kn", "s_ah", "s_ar")
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sm90_signature(fn, consts: dict, pointers: dict = SCORE_POINTERS, aligned=SCORE_ALIGNED,
                   types: dict | None = None) -> tuple[dict, dict]:
    """(signature, attrs) to compile jit function ``fn`` offline as launches would: ``consts`` as
    constexprs, ``pointers`` / ``types`` as typed, ``qk_scale`` fp32, other scalars i32, and
    pointers plus ``aligned`` strides divisible by 16."""
    params = list(inspect.signature(fn.fn).parameters)
    types = {**pointers, **(types or {})}
    sig = {p: types.get(p) or ("constexpr" if p in consts else "fp32" if p == "qk_scale" else "i32")
           for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in pointers or p in aligned}
    return sig, attrs


def _sass(fn, pointers: dict, aligned, consts: dict, num_warps: int, num_stages: int,
          types: dict | None = None, shared: list | None = None) -> str:
    """The SASS of ``fn`` compiled for sm_90a; its shared memory in bytes is appended to ``shared``."""
    import triton
    import triton.backends.nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = sm90_signature(fn, consts, pointers, aligned, types)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    if shared is not None:
        shared.append(k.metadata.shared)
    nvdisasm = Path(triton.backends.nvidia.__path__[0]) / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        return subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


def mma_loops(sass: str) -> list[dict]:
    """``mma_loop`` of every distinct innermost loop that holds HGMMA instructions, in code order
    (the scoring kernel has two: the whole tiles' TMA loop and the edge tiles' masked one)."""
    lines = sass.splitlines()
    loops, end = [], -1
    for i, line in enumerate(lines):
        if "HGMMA" in line and i > end:
            loop = mma_loop(sass, i)
            loops.append(loop)
            end = loop.pop("end")
    return loops


def mma_loop(sass: str, first: int | None = None) -> dict:
    """The innermost loop around the first HGMMA (or the one on line ``first``): of the labels
    before it that a branch after it jumps back to, the one whose back branch comes first (an
    mbarrier wait's retry block at the end of the kernel also jumps back into a TMA loop, from
    far away). Counts its instructions and opcodes (predication stripped); with ``first`` given,
    also its last line (``end``)."""
    lines = sass.splitlines()
    given = first is not None
    if not given:
        first = next(i for i, line in enumerate(lines) if "HGMMA" in line)
    loops = []  # (back branch, label line)
    for lab in range(first, -1, -1):
        m = re.match(r"^(\.L_x_\d+):", lines[lab])
        if m:
            back = next((i for i in range(first, len(lines)) if "BRA" in lines[i] and f"`({m[1]})" in lines[i]), None)
            if back is not None:
                loops.append((back, lab))
    if not loops:
        raise ValueError("no loop around the first HGMMA")
    back, lab = min(loops, key=lambda x: (x[0], -x[1]))
    body = [_INSTR.search(line) for line in lines[lab:back + 1]]
    ops = Counter(x[2] for x in body if x)
    rec = dict(instructions=sum(ops.values()), hgmma=ops["HGMMA"], ldgsts=ops["LDGSTS"],
               tma=ops["UTMALDG"], opcodes=dict(ops.most_common()))
    return {**rec, "end": back} if given else rec


def scoring_loop(stride: int, variant: str | None = None, head_dim: int = 128) -> list[dict]:
    """The scoring kernel's (or a probe variant's) MMA loops at the default tile, its shared
    memory and its register spills (STL / LDL anywhere in the kernel), compiled for sm_90a as
    serving launches it."""
    from vllm_xattn.kernels import scoring

    if variant:
        from probe_scoring_variants import load_variant
        mod = load_variant(variant)
    else:
        mod = scoring
    consts = dict(S=stride, D=head_dim, BLOCK_D=64, B=128, PAGE=16, BLOCK_M=128, BLOCK_N=256, PREC="tf32",
                  UPCAST=False, s_qd=1, s_kd=1)  # unit strides are specialised at launch
    types = {}
    if "TMA" in inspect.signature(mod._score_kernel.fn).parameters:
        consts["TMA"] = True  # the whole tiles' TMA path (descriptors made on the device)
    shared = []
    sass = _sass(mod._score_kernel, SCORE_POINTERS, SCORE_ALIGNED, consts, num_warps=8, num_stages=4,
                 types=types, shared=shared)
    loops = mma_loops(sass)
    names = ["whole tiles", "edge tiles"] if len(loops) == 2 else [None] * len(loops)
    spills = dict(kernel_spill_stores=len(re.findall(r"\bSTL\b", sass)),
                  kernel_spill_loads=len(re.findall(r"\bLDL\b", sass)))
    return [dict(kernel=f"scoring{', ' + variant if variant else ''}{', ' + nm if nm else ''}", stride=stride,
                 shared_bytes=shared[0], **spills, **loop) for nm, loop in zip(names, loops)]


def gemm_loop() -> dict:
    import bench_gemm_ceiling as g

    consts = dict(BM=128, BN=256, BK=64, HEADS_INNER=False)
    sass = _sass(g._gemm_rowsum_heads, {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp32"},
                 ("K", "s_ah", "s_am", "s_bh", "s_bn"), consts, num_warps=8, num_stages=3)
    return dict(kernel="plain GEMM, pointer loads (bench_gemm_ceiling)", **mma_loop(sass))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--variants", nargs="*", default=[], help="probe_scoring_variants.py variants too")
    ap.add_argument("--out", type=Path, help="also write the records here (benchmarks/results/...)")
    args = ap.parse_args()
    records = [gemm_loop()] + [rec for s in args.strides for v in [None, *args.variants] for rec in scoring_loop(s, v)]
    for rec in records:
        print(json.dumps(rec))
    if args.out:
        import triton

        from bench_common import write_records
        write_records(args.out, records, "python scripts/sass_loop.py " + shlex.join(sys.argv[1:]),
                      device=f"none: compiled offline for sm_90a (Triton {triton.__version__}'s ptxas)")


if __name__ == "__main__":
    main()
