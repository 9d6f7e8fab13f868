"""Host time of one scheduler step's sparse planning (what the XATTN metadata builder adds per
step, once for all layers), by part: ``plan_prefill``, the executor's mini-request order and
``SparseStep.from_host_plan`` with its one device copy (plan and order together). One request,
no context, 32 query heads (Llama-3.1-8B layer), S=16; median of 7 calls after a synchronize.

    python scripts/bench_host_plan.py --out benchmarks/results/host_plan_h100.json

(benchmarks/results/logs/plan_probe_h100_e803eff.log is this script's output at e803eff,
before it wrote JSON.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_records  # noqa: E402

from vllm_xattn.backends.executors import fa3_takes_seqused_q  # noqa: E402
from vllm_xattn.backends.sparse_prefill import SparseStep  # noqa: E402
from vllm_xattn.kernels import plan_prefill  # noqa: E402


def median_ms(f, k=7):
    ts = []
    for _ in range(k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[k // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/host_plan_h100.json")
    args = ap.parse_args()
    records = []
    for n in args.seq_lens:
        cu, sl = torch.tensor([0, n]), torch.tensor([n])
        plan = plan_prefill(cu, sl, block_size=128, stride=16)
        bt = torch.zeros(1, n // 16, dtype=torch.int32, device="cuda")
        order = plan.mini_requests_longest_first(args.heads)
        rec = dict(seq_len=n, num_q_heads=args.heads, stride=16, fa3_takes_seqused_q=fa3_takes_seqused_q(),
                   plan_prefill_ms=median_ms(lambda: plan_prefill(cu, sl, block_size=128, stride=16)),
                   mini_cu_seqlens_q_ms=median_ms(lambda: plan.mini_cu_seqlens_q(args.heads)),
                   longest_first_ms=median_ms(lambda: plan.mini_requests_longest_first(args.heads)),
                   plan_to_device_ms=median_ms(lambda: plan.to("cuda")),
                   # what SparseStep copies: the plan with the order's tensors in the same copy
                   plan_and_order_to_device_ms=median_ms(lambda: plan.to("cuda", *order)),
                   from_host_plan_ms=median_ms(lambda: SparseStep.from_host_plan(
                       plan, block_table=bt, tok_start=0, tok_end=n, selection_heads=args.heads, device="cuda")))
        records.append(rec)
        print(rec, flush=True)
    write_records(Path(args.out), records, "python scripts/bench_host_plan.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
