"""Engine time to first token with `vllm bench latency` (one prompt, one output token), FLASH_ATTN
vs XATTN settings, in alternating rounds (one engine per setting and round).

    python scripts/bench_latency.py --llama8b-dummy /tmp/llama8b --tokenizer-from QWEN_HF_DIR \
        --length 131072 --settings dense '{"selection": "ratio", "ratio": 0.1}' \
        [--max-num-batched-tokens 8192] --out benchmarks/results/latency_llama_128k_h100.json

What this measures against ``bench_e2e.py`` (`vllm serve` + `vllm bench serve`): the same
engine step loop without the HTTP front end, whose text tokenisation of a long prompt costs
the same with either backend and so dilutes a speedup. Each record is the median over the
rounds of the per-run average latency (``--num-iters`` prompts after ``--num-iters-warmup``).
Chunk size: `vllm bench latency` runs the offline ``LLM`` defaults (max_num_batched_tokens
16384 on the H100) unless ``--max-num-batched-tokens`` is given; `vllm serve` defaults to 8192.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, merge_records, write_records  # noqa: E402
from bench_e2e import add_model_args, resolve_model  # noqa: E402
from serve_util import ENV, backend_args  # noqa: E402


def latency_command(model: str, setting: str, *, length: int, iters: int, warmup: int,
                    model_args: list[str], max_num_batched_tokens: int | None, out_json: str) -> list[str]:
    """The `vllm bench latency` command of one setting ("dense" or XATTN knobs as JSON)."""
    cmd = ["vllm", "bench", "latency", "--model", model, *model_args, "--input-len", str(length),
           "--output-len", "1", "--batch-size", "1", "--num-iters-warmup", str(warmup),
           "--num-iters", str(iters), "--max-model-len", str(length + 512),
           "--gpu-memory-utilization", "0.9", "--output-json", out_json]
    if max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    return cmd + backend_args(None if setting == "dense" else json.loads(setting))


def jit_compiles(log: str) -> list[str]:
    """Triton kernels that vLLM's JIT monitor saw compile after the engine's warm-up (a latency
    spike in a request; each variant is warned about once)."""
    return re.findall(r"Triton kernel JIT compilation during inference: (\w+)", log)


def pair_records(name: str, length: int, runs: dict[str, list[dict]], **common) -> list[dict]:
    """Per setting: the median of its runs' average latencies (ms), paired with dense."""
    ttft = {s: statistics.median(r["avg_latency"] for r in rs) * 1e3 for s, rs in runs.items()}
    dense = ttft.get("dense")
    records = []
    for setting, rs in runs.items():
        rec = dict(model=name, setting=setting, knobs={} if setting == "dense" else json.loads(setting),
                   prompt_len=length, ttft_ms=ttft[setting],
                   run_avg_ms=[r["avg_latency"] * 1e3 for r in rs],
                   latencies_ms=[[x * 1e3 for x in r["latencies"]] for r in rs],
                   max_num_batched_tokens=sorted({r.get("max_num_batched_tokens") for r in rs}, key=str),
                   jit_compiles_during_inference=[r.get("jit_compiles_during_inference") for r in rs],
                   density=1.0 if setting == "dense" else None, **common)
        if dense is not None:
            rec.update(ttft_ms_dense=dense, ttft_speedup=dense / ttft[setting])
        records.append(rec)
    return records


def main():
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--settings", nargs="+", default=["dense", '{"selection": "ratio", "ratio": 0.1}'])
    ap.add_argument("--rounds", type=int, default=2, help="engines per setting, alternating")
    ap.add_argument("--num-iters", type=int, default=5)
    ap.add_argument("--num-iters-warmup", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="chunk size (default: the offline LLM default)")
    ap.add_argument("--out", default="benchmarks/results/latency_h100.json")
    ap.add_argument("--logs", metavar="DIR", help="keep each engine's console output here")
    ap.add_argument("--also-into", metavar="RESULTS_JSON",
                    help="also put the records into this results file (e.g. "
                         "benchmarks/results/e2e_h100.json), replacing the same setting / length / chunk")
    args = ap.parse_args()

    model, name, model_args = resolve_model(args)
    runs: dict[str, list[dict]] = {s: [] for s in args.settings}
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(args.rounds):
            for i, setting in enumerate(args.settings):
                out_json = f"{d}/r{rnd}_{i}.json"
                cmd = latency_command(model, setting, length=args.length, iters=args.num_iters,
                                      warmup=args.num_iters_warmup, model_args=model_args,
                                      max_num_batched_tokens=args.max_num_batched_tokens,
                                      out_json=out_json)
                proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{setting}: vllm bench latency failed:\n{proc.stderr[-4000:]}")
                res = json.loads(Path(out_json).read_text())
                log = proc.stdout + proc.stderr
                if args.logs:
                    Path(args.logs).mkdir(parents=True, exist_ok=True)
                    (Path(args.logs) / f"round{rnd}_setting{i}.log").write_text(log)
                # The chunk size the engine really ran (its log line), not the flag.
                chunk = re.search(r"max_num_batched_tokens=(\d+)", log)
                res["max_num_batched_tokens"] = int(chunk.group(1)) if chunk else None
                res["jit_compiles_during_inference"] = jit_compiles(log)
                runs[setting].append(res)
                print(f"round {rnd} {setting}: {runs[setting][-1]['avg_latency'] * 1e3:.1f} ms", flush=True)
    command = "python scripts/bench_latency.py " + " ".join(sys.argv[1:])
    records = pair_records(name, args.length, runs, method="vllm bench latency", commit=commit(),
                           date=time.strftime("%Y-%m-%d"), command=command)
    write_records(Path(args.out), records, command)
    if args.also_into:
        merge_records(Path(args.also_into), records,
                      key=("model", "method", "setting", "prompt_len", "max_num_batched_tokens"))
    print("| setting | TTFT ms | dense ms | speedup |\n|---|---|---|---|")
    for r in records:
        print(f"| {r['setting']} | {r['ttft_ms']:.1f} | {r.get('ttft_ms_dense', float('nan')):.1f} | "
              f"{r.get('ttft_speedup', float('nan')):.3f}x |")


if __name__ == "__main__":
    main()
