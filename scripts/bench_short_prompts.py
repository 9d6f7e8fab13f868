"""Short prompts (below min_sparse_tokens): is XATTN's TTFT within 2 % of FLASH_ATTN's?

Both servers run the same FlashAttention kernels there, so the question is the backend's own
overhead, and one server per setting measured one after the other cannot answer it: the same
dense configuration gave a 1K TTFT of 20.5 ms in one start and 36.5 ms in another
(benchmarks/results/logs/e2e_qwen_*.log). Here both servers run at the same time on the same
GPU and are measured in alternating rounds (the order flips every round), so drift and
start-to-start differences hit both; the result is the median over rounds of the per-round
ratio XATTN / FLASH_ATTN.

    python scripts/bench_short_prompts.py --llama8b-dummy /tmp/llama8b --tokenizer-from QWEN_HF_DIR \
        --out benchmarks/results/short_prompts_h100.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_records  # noqa: E402
from bench_e2e import add_model_args, bench_serve, resolve_model  # noqa: E402
from serve_util import backend_args, vllm_server  # noqa: E402


def paired_summary(rounds: list[dict[str, float]]) -> dict:
    """Per-round medians {"dense": ms, "xattn": ms} -> the median, min and max of the per-round
    ratio xattn / dense, and the median TTFT of each server over rounds."""
    ratios = [r["xattn"] / r["dense"] for r in rounds]
    return dict(rounds=len(rounds), ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                ratio_max=max(ratios), dense_ms=statistics.median(r["dense"] for r in rounds),
                xattn_ms=statistics.median(r["xattn"] for r in rounds))


def main():
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=10, help="prompts per server, length and round")
    ap.add_argument("--xattn", default="{}", help="XATTN knobs (JSON); the defaults by default")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.42, help="per server")
    ap.add_argument("--out", default="benchmarks/results/short_prompts_h100.json")
    ap.add_argument("--log-dir", default="/tmp/bench_short")
    args = ap.parse_args()

    model, name, model_args = resolve_model(args)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    common = ["--max-model-len", str(max(args.lengths) + 512), "--no-enable-prefix-caching",
              "--gpu-memory-utilization", str(args.gpu_memory_utilization), *model_args]
    servers = {"dense": backend_args(None), "xattn": backend_args(json.loads(args.xattn))}
    t0 = time.time()
    urls = {}
    with contextlib.ExitStack() as stack:
        # One after the other: vLLM sizes its KV cache from the memory it sees while profiling,
        # which another engine starting at the same time would disturb.
        for server, backend in servers.items():
            urls[server] = stack.enter_context(vllm_server(model, common + backend, log_dir / f"serve-{server}.log"))
            bench_serve(urls[server], model, input_len=max(args.lengths), output_len=1, num_prompts=2,
                        concurrency=1)  # warm-up
            print(f"{server}: up and warm after {time.time() - t0:.0f} s", flush=True)
        per_round = {n: [] for n in args.lengths}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for i, n in enumerate(args.lengths):
                got = {server: bench_serve(urls[server], model, input_len=n, output_len=1, concurrency=1,
                                           num_prompts=args.prompts, seed=1000 * r + i)["median_ttft_ms"]
                       for server in order}
                per_round[n].append(got)
                print(f"round {r} {n}: dense {got['dense']:.1f} ms, xattn {got['xattn']:.1f} ms", flush=True)
    records = [dict(model=name, prompt_len=n,
                    xattn=json.loads(args.xattn), prompts_per_round=args.prompts,
                    per_round=per_round[n], **paired_summary(per_round[n])) for n in args.lengths]
    write_records(Path(args.out), records, "python scripts/bench_short_prompts.py " + " ".join(sys.argv[1:]))
    print("\n| prompt | FLASH_ATTN ms | XATTN ms | XATTN / dense (median of rounds) | min | max |")
    print("|---|---|---|---|---|---|")
    for rec in records:
        print(f"| {rec['prompt_len']} | {rec['dense_ms']:.1f} | {rec['xattn_ms']:.1f} | {rec['ratio_median']:.3f} | "
              f"{rec['ratio_min']:.3f} | {rec['ratio_max']:.3f} |")


if __name__ == "__main__":
    main()
