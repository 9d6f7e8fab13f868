"""Where a long prefill's time goes inside vLLM: GPU kernel time by kind and GPU idle time, for
FLASH_ATTN and XATTN settings, one engine per setting (``LLM`` with vLLM's torch profiler).

    python scripts/profile_prefill.py --llama8b-dummy /tmp/llama8b --tokenizer-from QWEN_HF_DIR \
        --length 131072 --settings dense '{"selection": "ratio", "ratio": 0.1}' \
        --out benchmarks/results/profile_prefill_h100.json

Per setting: one warm-up prompt (JIT, allocator), then one profiled prompt of ``--length``
random tokens (1 output token). From the worker's trace: the span from its first to its last
GPU kernel, the time some kernel runs (busy) and the rest (idle: host-bound gaps), kernel time
by kind (FA3, the XATTN Triton kernels, everything else) and the top kernels. Per-layer
benchmarks leave out exactly what this measures: what the model's other kernels, the host
and the scheduler add between attention calls.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, device_name  # noqa: E402
from bench_e2e import add_model_args, resolve_model  # noqa: E402

XATTN_KERNELS = ("_score_kernel", "_select_kernel", "_page_list_kernel", "_csr_lengths_kernel",
                 "_copy_tokens_heads_kernel")


def kernel_kind(name: str) -> str:
    if name.startswith(XATTN_KERNELS):
        return "xattn_triton"
    if "flash" in name.lower():  # FA3's forward and its varlen scheduler kernels
        return "flash_attn"
    return "other"


def summarize_trace(events: list[dict], gap_ms: float = 0.5) -> dict:
    """GPU kernels of a chrome trace -> span, busy (union of kernel intervals), idle, idle in
    gaps longer than ``gap_ms``, time by kind and the 15 longest kernels by total (all in ms)."""
    ks = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
    if not ks:
        raise ValueError("no GPU kernels in the trace")
    busy, big_gaps, n_big = 0.0, 0.0, 0
    cur_s, cur_e = ks[0]["ts"], ks[0]["ts"] + ks[0]["dur"]
    by_kind, by_name = defaultdict(float), defaultdict(float)
    for e in ks:
        by_kind[kernel_kind(e["name"])] += e["dur"]
        by_name[e["name"][:90]] += e["dur"]
        s, t = e["ts"], e["ts"] + e["dur"]
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e > gap_ms * 1e3:
                big_gaps += s - cur_e
                n_big += 1
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    busy += cur_e - cur_s
    span = cur_e - ks[0]["ts"]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return dict(span_ms=span / 1e3, busy_ms=busy / 1e3, idle_ms=(span - busy) / 1e3,
                idle_in_long_gaps_ms=big_gaps / 1e3, long_gaps=n_big, gap_threshold_ms=gap_ms,
                kernels=len(ks), kernel_ms_by_kind={k: v / 1e3 for k, v in sorted(by_kind.items())},
                top_kernels_ms={k: v / 1e3 for k, v in top})


def load_worker_trace(trace_dir: Path) -> list[dict]:
    """The trace with GPU kernels (the worker's; the front end writes one without)."""
    for path in sorted(trace_dir.rglob("*.json*"), key=lambda p: -p.stat().st_size):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        if any(e.get("cat") == "kernel" for e in events):
            return events
    raise FileNotFoundError(f"no trace with GPU kernels under {trace_dir}")


def profile_one(model: str, setting: str, length: int, trace_dir: Path, llm_args: dict) -> dict:
    """One engine: warm-up prompt, then the profiled prompt; returns the trace summary."""
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    backend = {"attention_backend": "FLASH_ATTN"} if setting == "dense" else {
        "attention_backend": "XATTN", "additional_config": {"xattn": json.loads(setting)}}
    llm = LLM(model=model, max_model_len=length + 512, enable_prefix_caching=False,
              gpu_memory_utilization=0.9,
              profiler_config={"profiler": "torch", "torch_profiler_dir": str(trace_dir),
                               "torch_profiler_with_stack": False},
              **backend, **llm_args)
    vocab = llm.get_tokenizer().vocab_size
    rng = np.random.default_rng(0)
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(100, vocab - 100, length).tolist())
               for _ in range(2)]
    sp = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate(prompts[0], sp, use_tqdm=False)  # warm-up
    llm.start_profile()
    t0 = time.perf_counter()
    llm.generate(prompts[1], sp, use_tqdm=False)
    wall = (time.perf_counter() - t0) * 1e3
    llm.stop_profile()
    time.sleep(5)  # the worker writes its trace after stop
    return dict(setting=setting, prompt_len=length, profiled_wall_ms=wall,
                **summarize_trace(load_worker_trace(trace_dir)))


def main():
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--settings", nargs="+", default=["dense", '{"selection": "ratio", "ratio": 0.1}'])
    ap.add_argument("--out", default="benchmarks/results/profile_prefill_h100.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one setting, in its own process
    args = ap.parse_args()
    model, name, model_args = resolve_model(args)
    llm_args = {"load_format": "dummy"} if "--load-format" in model_args else {}
    if args.child is not None:
        with tempfile.TemporaryDirectory() as d:
            print("RESULT " + json.dumps(profile_one(model, args.child, args.length, Path(d), llm_args)))
        return
    records = []
    for setting in args.settings:  # a fresh process per engine: GPU memory is fully returned
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", setting]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{setting}: engine process failed:\n{proc.stderr[-4000:]}")
        out = proc.stdout
        rec = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
        records.append(dict(rec, model=name))
    result = dict(device=device_name(), commit=commit(), date=time.strftime("%Y-%m-%d"),
                  command="python scripts/profile_prefill.py " + " ".join(sys.argv[1:]), records=records)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| setting | wall ms | GPU span | busy | idle | flash_attn | xattn_triton | other |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        k = r["kernel_ms_by_kind"]
        print(f"| {r['setting']} | {r['profiled_wall_ms']:.0f} | {r['span_ms']:.0f} | {r['busy_ms']:.0f} | "
              f"{r['idle_ms']:.0f} | {k.get('flash_attn', 0):.0f} | {k.get('xattn_triton', 0):.0f} | "
              f"{k.get('other', 0):.0f} |")


if __name__ == "__main__":
    main()
