"""Nsight Compute view of the scoring kernel's memory traffic (diagnosis, H100).

``run`` launches one case twice (Nsight profiles the second launch, after compilation), either
the scoring kernel (``real``) or one of ``probe_scoring_variants.py``'s variants at stride S and
N tokens on the Llama layer, or (``gemm``) the all-heads GEMMs of ``bench_gemm_ceiling.py`` at
the 32K / S=8 size (pointer and TMA loads, heads innermost and one head at a time):

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \\
        --section Occupancy --kernel-name regex:_score_kernel --launch-skip 1 --launch-count 1 \\
        python scripts/ncu_scoring.py run real 8 32768 > ncu_score_real_s8.txt
    ncu ... --kernel-name regex:_gemm_rowsum --launch-count 4 python scripts/ncu_scoring.py run gemm > ncu_gemm.txt

``summarize`` turns those text reports into one JSON of records (one per profiled kernel):

    python scripts/ncu_scoring.py summarize --device "NVIDIA H100 80GB HBM3" --commit C \\
        --out benchmarks/results/scoring_ncu_h100.json LOG...
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The report lines kept, by their metric name in ncu's text output.
METRICS = (
    "Duration", "SM Frequency", "DRAM Throughput", "L2 Cache Throughput", "L1/TEX Cache Throughput",
    "Compute (SM) Throughput", "Memory Throughput", "L2 Hit Rate", "Mem Busy", "Issue Slots Busy",
    "Executed Ipc Active", "Registers Per Thread", "Dynamic Shared Memory Per Block",
    # --set full: instructions and the stall reasons (cycles per issued instruction)
    "Executed Instructions", "Warp Cycles Per Issued Instruction", "Stall Dispatch Stall", "Stall Wait",
    "Stall Long Scoreboard", "Stall Barrier", "Stall Math Pipe Throttle", "Stall Not Selected", "Stall GMMA",
)
# ``run gemm`` launches these in this order (the report names only the kernel).
GEMM_CASES = ("pointer loads, heads innermost", "pointer loads, one head at a time",
              "TMA loads, heads innermost", "TMA loads, one head at a time")
_KERNEL = re.compile(r"^\s{2}(\w+) \((\d+), 1, 1\)x\((\d+), 1, 1\)")
_METRIC = re.compile(r"^\s{4}(" + "|".join(re.escape(m) for m in METRICS) + r")\s{2,}(\S+)\s+([\d.,]+)\s*$")


def parse_report(text: str) -> list[dict]:
    """One dict per profiled kernel in an ncu text report: kernel, grid, block and the
    ``METRICS`` found, each as {name: [value, unit]}. A metric printed twice in one kernel's
    sections with another value (Memory Throughput: % and bytes/s) keeps both, the unit
    telling them apart."""
    kernels: list[dict] = []
    for line in text.splitlines():
        if m := _KERNEL.match(line):
            kernels.append(dict(kernel=m[1], grid=int(m[2]), block=int(m[3]), metrics={}))
        elif kernels and (m := _METRIC.match(line)):
            name, unit, value = m[1], m[2], float(m[3].replace(",", ""))
            seen = kernels[-1]["metrics"]
            if seen.get(name) == [value, unit]:  # the same line printed by two sections
                continue
            seen[name if name not in seen else f"{name} ({unit})"] = [value, unit]
    gemms = [k for k in kernels if k["kernel"].startswith("_gemm_rowsum")]
    if len(gemms) == len(GEMM_CASES):
        for k, case in zip(gemms, GEMM_CASES):
            k["case"] = case
    return kernels


def run_case(what: str, stride: int = 8, n: int = 32768) -> None:
    import torch

    from bench_common import SHAPES, paged_inputs

    if what == "gemm":
        from bench_gemm_ceiling import heads_gemm_launchers

        H, KV, M, K = 32, 8, n // stride, stride * 128
        a = torch.randn(H, M, K, device="cuda").to(torch.bfloat16)
        b = torch.randn(KV, M, K, device="cuda").to(torch.bfloat16)
        out = torch.empty(H, M, M // 256, device="cuda")
        for launch in heads_gemm_launchers(a, b, out).values():  # GEMM_CASES' order
            launch()
    else:
        from probe_scoring_variants import load_variant

        from vllm_xattn.kernels import plan_prefill, scoring

        mod = scoring if what == "real" else load_variant(what)
        q, kv, bt, cu, sl = paged_inputs([n], [n], **SHAPES["llama-3.1-8b"])
        plan = plan_prefill(cu, sl, block_size=128, stride=stride).to("cuda")
        for _ in range(2):
            mod.antidiagonal_scores_paged(q, kv, bt, plan)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="launch one case (under ncu)")
    r.add_argument("what", help="'real', a probe variant name, or 'gemm'")
    r.add_argument("stride", type=int, nargs="?", default=8)
    r.add_argument("tokens", type=int, nargs="?", default=32768)
    s = sub.add_parser("summarize", help="ncu text reports -> JSON records")
    s.add_argument("logs", type=Path, nargs="+")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--command", default="", help="the ncu command lines that wrote the logs")
    s.add_argument("--device", required=True, help="the GPU the reports came from (summarize runs anywhere)")
    s.add_argument("--commit", required=True, help="the commit the reports were taken at")
    s.add_argument("--label", nargs="*", default=[], metavar="REPORT=CASE",
                   help="the case a report's kernels ran (file name = text)")
    args = ap.parse_args()
    if args.cmd == "run":
        run_case(args.what, args.stride, args.tokens)
        return
    from bench_common import write_records

    labels = dict(x.split("=", 1) for x in args.label)
    records = [dict(report=p.name, **({"case": labels[p.name]} if p.name in labels else {}), **k)
               for p in args.logs for k in parse_report(p.read_text())]
    write_records(args.out, records, args.command or "python scripts/ncu_scoring.py summarize ...",
                  device=args.device, commit=args.commit)
    for rec in records:
        m = rec["metrics"]
        print(rec["report"], rec["kernel"], {k: m[k][0] for k in ("Duration", "DRAM Throughput", "L2 Hit Rate") if k in m})


if __name__ == "__main__":
    main()
