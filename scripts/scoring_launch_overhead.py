"""Host time per scoring call next to its GPU time, with and without the whole-tile TMA path.

A call that costs the host more than the GPU leaves the GPU idle between layers when nothing
else is queued. Per case: ``do_bench`` (median ms, what bench_scoring.py reports), the host's
ms per call over 50 calls without synchronising, and the GPU's ms per call for 20 calls queued
behind a sleep kernel (so the host is never the limit there):

    python scripts/scoring_launch_overhead.py --out benchmarks/results/scoring_launch_overhead_h100.json

``--profile`` also prints where the host time of each path goes (cProfile over 200 calls of the
first case, top functions by cumulative time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, paged_inputs, write_records  # noqa: E402

from vllm_xattn.kernels import antidiagonal_scores_paged, copy_keys, plan_prefill  # noqa: E402

CASES = [("qwen2.5-0.5b", 32768, 16), ("qwen2.5-0.5b", 32768, 8), ("llama-3.1-8b", 8192, 16),
         ("llama-3.1-8b", 32768, 16), ("llama-3.1-8b", 32768, 8), ("llama-3.1-8b", 131072, 16),
         ("llama-3.1-8b", 131072, 8)]


def host_and_gpu_ms(fn, calls: int = 50, queued: int = 20) -> tuple[float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    torch.cuda._sleep(int(5e8))  # the queue fills while the GPU sleeps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(queued):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / queued


def host_profile(fn, calls: int = 200, top: int = 25) -> str:
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scoring_launch_overhead_h100.json"))
    ap.add_argument("--profile", action="store_true", help="cProfile each path's host time on the first case")
    args = ap.parse_args()
    records = []
    for case, (shape, n, S) in enumerate(CASES):
        dims = SHAPES[shape]
        q, kv, bt, cu, sl = paged_inputs([n], [n], **dims)
        plan = plan_prefill(cu, sl, block_size=128, stride=S).to("cuda")
        # serving passes preallocated buffers (the scratch pool): so do these calls
        out = torch.empty(dims["num_q_heads"], plan.total_q_blocks, plan.max_kb, device="cuda")
        keys = copy_keys(kv, bt, plan)
        want = antidiagonal_scores_paged(q, kv, bt, plan, tma=False).clone()
        fns = {"tma": lambda: antidiagonal_scores_paged(q, kv, bt, plan, out=out, key_copy=keys),
               "masked loads only": lambda: antidiagonal_scores_paged(q, kv, bt, plan, out=out, tma=False),
               "key copy alone": lambda: copy_keys(kv, bt, plan, out=keys)}
        assert torch.allclose(fns["tma"](), want, rtol=1e-4, atol=1e-6), (shape, n, S)
        for name, fn in fns.items():
            fn()
            if args.profile and case == 0:
                print(f"--- host profile: {shape} N={n} S={S} {name} (200 calls)\n{host_profile(fn)}", flush=True)
            bench = do_bench(fn, rep=200)
            host, gpu = host_and_gpu_ms(fn)
            rec = dict(shape=shape, seq_len=n, stride=S, path=name, do_bench_ms=bench, host_ms_per_call=host,
                       gpu_ms_per_call_queued=gpu)
            records.append(rec)
            print(rec, flush=True)
    write_records(args.out, records, "python scripts/scoring_launch_overhead.py " + " ".join(sys.argv[1:]))
    print("\n| shape | N | S | path | do_bench ms | host ms / call | GPU ms / call (queued) |\n|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['shape']} | {r['seq_len']} | {r['stride']} | {r['path']} | {r['do_bench_ms']:.3f} | "
              f"{r['host_ms_per_call']:.3f} | {r['gpu_ms_per_call_queued']:.3f} |")


if __name__ == "__main__":
    main()
