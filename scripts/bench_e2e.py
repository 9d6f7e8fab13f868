"""End-to-end speed through `vllm serve` + `vllm bench serve`: TTFT by prompt length, decode
throughput and a mixed short/long serving run, FLASH_ATTN vs XATTN settings, same GPU.

    # Llama-3.1-8B-shaped model with dummy weights (a tokenizer is copied in for the random
    # dataset; vocab sized to it), densities fixed by ratio selection:
    python scripts/bench_e2e.py --llama8b-dummy /tmp/llama8b --tokenizer-from QWEN_HF_DIR \
        --lengths 8192 16384 32768 65536 131072 \
        --settings dense '{"selection": "ratio", "ratio": 0.1}' '{"selection": "ratio", "ratio": 0.2}'
    # the real Qwen2.5-0.5B, thresholds:
    python scripts/bench_e2e.py --model QWEN_HF_DIR --lengths 8192 16384 32000 \
        --settings dense '{}' '{"threshold": 0.95}'

One server per setting (its kernels warmed up by a first request), one `vllm bench serve`
client run per measurement; results in benchmarks/results/e2e_h100.json. Settings of the
same model already in that file are kept and not rerun (each record names the commit, date
and command it came from), so a session can add one setting; `--fresh` measures anew.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, line_plot, write_records  # noqa: E402
from serve_util import ENV, backend_args, measured_density, vllm_server  # noqa: E402

from vllm_xattn.backends.density_log import ENV_VAR, read_density  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json",
                   "merges.txt", "special_tokens_map.json")


def write_llama8b_dummy(path: Path, tokenizer_dir: Path) -> Path:
    """Llama-3.1-8B layer shapes (32 layers, 32 q / 8 kv heads, d 128), dummy weights, with a
    real tokenizer copied in (vocab sized to it) so that prompts can be text."""
    from transformers import AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": vocab,
           "max_position_embeddings": 131072 + 1024, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def bench_serve(url: str, model: str, *, input_len: int, output_len: int, num_prompts: int,
                concurrency: int, range_ratio: float = 0.0, seed: int = 0) -> dict:
    """One `vllm bench serve` run on the random dataset; returns its result JSON. The random
    dataset's prompts of one seed share prefixes across lengths: each run gets its own seed
    (and the servers run without prefix caching) so that every prompt is computed cold."""
    with tempfile.TemporaryDirectory() as d:
        cmd = ["vllm", "bench", "serve", "--base-url", url, "--model", model,
               "--tokenizer", model, "--dataset-name", "random",
               "--random-input-len", str(input_len), "--random-output-len", str(output_len),
               "--random-range-ratio", str(range_ratio), "--num-prompts", str(num_prompts),
               "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed),
               "--disable-tqdm", "--save-result", "--result-dir", d, "--result-filename", "r.json"]
        subprocess.run(cmd, check=True, env=ENV, capture_output=True, text=True)
        return json.loads((Path(d) / "r.json").read_text())


def measure_setting(model: str, setting: str, server: list[str], args, log_dir: Path) -> dict:
    """TTFT per length (+ measured density), decode and mixed serving for one server setting."""
    tag = hashlib.sha1(setting.encode()).hexdigest()[:8]
    density_dir = log_dir / f"density-{tag}"
    shutil.rmtree(density_dir, ignore_errors=True)
    res, dens = {}, {}
    t0 = time.time()
    env = {} if args.no_density_log else {ENV_VAR: str(density_dir)}
    with vllm_server(model, server, log_dir / f"serve-{tag}.log", env=env) as url:
        bench_serve(url, model, input_len=max(args.lengths), output_len=1, num_prompts=1,
                    concurrency=1)  # warm-up: Triton/FlashAttention JIT, allocator
        def density_since(before):  # (density, totals); none without the log
            return measured_density(url, model, density_dir, before) if env else (None, before)

        _, totals = density_since(read_density(density_dir))
        print(f"{setting}: server up and warm after {time.time() - t0:.0f} s", flush=True)
        for i, n in enumerate(args.lengths):
            r = bench_serve(url, model, input_len=n, output_len=1, concurrency=1, seed=1 + i,
                            num_prompts=args.short_prompts if n < 8192 else args.prompts_per_length)
            res[n] = r["median_ttft_ms"]
            dens[n], totals = density_since(totals)
            print(f"{setting} {n}: TTFT {res[n]:.1f} ms, density {dens[n]}", flush=True)
        per_layer = totals["per_layer"]  # everything logged so far: warm-up and TTFT runs
        serving = dict(decode_tok_s=None, decode_tpot_ms=None, mixed_mean_ttft_ms=None, mixed_tok_s=None)
        if not args.ttft_only:
            dec = bench_serve(url, model, input_len=1024, output_len=256, num_prompts=64,
                              concurrency=32, seed=100)
            mixed = bench_serve(url, model, input_len=max(args.lengths) // 8, output_len=64,
                                num_prompts=16, concurrency=8, range_ratio=0.9, seed=200)
            serving = dict(decode_tok_s=dec["output_throughput"], decode_tpot_ms=dec["median_tpot_ms"],
                           mixed_mean_ttft_ms=mixed["mean_ttft_ms"], mixed_tok_s=mixed["output_throughput"])
        print(f"{setting}: done after {time.time() - t0:.0f} s", flush=True)
    return dict(ttft=res, density=dens, density_per_layer=per_layer, density_logged=bool(env), commit=commit(),
                date=time.strftime("%Y-%m-%d"), command="python scripts/bench_e2e.py " + " ".join(sys.argv[1:]),
                **serving)


# The TTFT method of this script's records; e2e_h100.json also holds `vllm bench latency` records
# (scripts/bench_latency.py --also-into), which this script keeps as they are.
METHOD = "vllm bench serve"


def _is_serve(record: dict) -> bool:
    """Whether a record is this script's (records from before ``method`` existed are)."""
    return record.get("method", METHOD) == METHOD


# Per-setting fields that travel with each record: where and how that setting was measured.
PROVENANCE = ("commit", "date", "command", "mixed_note", "density_logged")
SERVING = ("decode_tok_s", "decode_tpot_ms", "mixed_mean_ttft_ms", "mixed_tok_s")


def measured_from_records(results: dict, name: str) -> dict:
    """The ``measured`` entries of model ``name`` rebuilt from a results file, so that a run
    of one new setting keeps (and pairs with) the settings measured in earlier runs. Records
    without their own commit / date take the file's."""
    measured = {}
    for r in results.get("records", []):
        if r.get("model") != name or not _is_serve(r):
            continue
        m = measured.setdefault(r["setting"], dict(
            ttft={}, density={}, density_per_layer={},
            **{k: r.get(k) for k in SERVING},
            **{k: r.get(k, results.get(k)) for k in PROVENANCE if k in r or k in results}))
        m["ttft"][str(r["prompt_len"])] = r["ttft_ms"]
        m["density"][str(r["prompt_len"])] = r.get("density")
    return measured


def to_records(name: str, measured: dict) -> list[dict]:
    dense = measured.get("dense")
    records = []
    for setting, m in measured.items():
        knobs = {} if setting == "dense" else json.loads(setting)
        for n, ttft in m["ttft"].items():
            d = m["density"].get(n)
            if setting == "dense":
                density = 1.0
            elif m.get("density_logged", True):  # no record: below min_sparse_tokens, all blocks
                density = 1.0 if d is None else d
            else:
                density = None  # the server ran without the density log
            rec = dict(model=name, method=METHOD, setting=setting, knobs=knobs, prompt_len=int(n), ttft_ms=ttft,
                       density=density,
                       **{k: m.get(k) for k in SERVING},
                       **{k: m[k] for k in PROVENANCE if m.get(k) is not None})
            if dense is not None and n in dense["ttft"]:
                rec.update(ttft_ms_dense=dense["ttft"][n], ttft_speedup=dense["ttft"][n] / ttft,
                           decode_tok_s_dense=dense.get("decode_tok_s"),
                           decode_tpot_ms_dense=dense.get("decode_tpot_ms"),
                           mixed_mean_ttft_ms_dense=dense.get("mixed_mean_ttft_ms"))
            records.append(rec)
    return records


def save(out: Path, results: dict, name: str, measured: dict) -> list[dict]:
    """Write ``out``: other models' records as they were, this model's from ``measured``,
    the file's hand-written "note" kept; and the TTFT plot beside it."""
    old = results.get("records", [])
    records = [r for r in old if r.get("model") != name or not _is_serve(r)] + to_records(name, measured)
    write_records(out, records, "python scripts/bench_e2e.py " + " ".join(sys.argv[1:]),
                  **{k: results[k] for k in ("note",) if k in results})
    series = {}
    for r in records:
        if _is_serve(r):
            series.setdefault(f"{r['model']} {r['setting']}", []).append((r["prompt_len"], r["ttft_ms"] / 1000))
    line_plot(out.with_suffix(".png"), series, xlabel="prompt tokens", ylabel="TTFT (s)")
    return records


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model (real weights) or --llama8b-dummy (+ --tokenizer-from)."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model folder (real weights)")
    src.add_argument("--llama8b-dummy", help="folder to write the Llama-8B-shaped dummy model to")
    ap.add_argument("--tokenizer-from", help="with --llama8b-dummy: HF folder whose tokenizer to copy")


def resolve_model(args) -> tuple[str, str, list[str]]:
    """(model folder to serve, its name in the records, the `vllm serve` arguments it needs)
    from the ``add_model_args`` arguments; writes the dummy model's folder."""
    if args.llama8b_dummy is None:
        return args.model, Path(args.model).name, []
    model = write_llama8b_dummy(Path(args.llama8b_dummy), Path(args.tokenizer_from))
    return str(model), "llama-3.1-8b-dummy", ["--load-format", "dummy"]


def main():
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    ap.add_argument("--settings", nargs="+", default=["dense", "{}"])
    ap.add_argument("--prompts-per-length", type=int, default=2)
    ap.add_argument("--short-prompts", type=int, default=30, help="prompts per length under 8K")
    ap.add_argument("--out", default="benchmarks/results/e2e_h100.json")
    ap.add_argument("--log-dir", default="/tmp/bench_e2e",
                    help="server logs and measured.json: settings measured there are not rerun, "
                         "so one setting per invocation works (device time limits)")
    ap.add_argument("--ttft-only", action="store_true",
                    help="skip the decode and mixed-serving runs (their fields stay null)")
    ap.add_argument("--no-density-log", action="store_true",
                    help="run the servers without XATTN_DENSITY_LOG (what users run); densities "
                         "are then recorded as null")
    ap.add_argument("--fresh", action="store_true",
                    help="measure every --settings anew and drop this model's other records from "
                         "--out (by default they are kept and not rerun, each record carrying the "
                         "commit and date it was measured at)")
    args = ap.parse_args()

    model, name, model_args = resolve_model(args)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    state_path = log_dir / f"measured-{name}.json"
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    measured = {} if args.fresh else measured_from_records(results, name)
    measured.update(json.loads(state_path.read_text()) if state_path.exists() else {})
    for setting in args.settings:
        if setting in measured:
            continue
        server = ["--max-model-len", str(max(args.lengths) + 512), "--gpu-memory-utilization", "0.9",
                  "--no-enable-prefix-caching", *model_args]
        server += backend_args(None if setting == "dense" else json.loads(setting))
        # Through JSON so that fresh and resumed results both key lengths by str.
        measured[setting] = json.loads(json.dumps(measure_setting(model, setting, server, args, log_dir)))
        state_path.write_text(json.dumps(measured))
        save(out, results, name, measured)  # after every setting: a time limit loses one at most
    records = save(out, results, name, measured)
    print("\n| model | setting | prompt | density | TTFT ms | dense ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        if r["model"] == name and _is_serve(r):
            dens = "n/a" if r["density"] is None else f"{r['density']:.3f}"
            print(f"| {name} | {r['setting']} | {r['prompt_len']} | {dens} | {r['ttft_ms']:.1f} | "
                  f"{r.get('ttft_ms_dense', float('nan')):.1f} | {r.get('ttft_speedup', float('nan')):.2f}x |")
    for setting, m in measured.items():
        print(f"{setting}: decode {m.get('decode_tok_s')} tok/s (TPOT {m.get('decode_tpot_ms')} ms), "
              f"mixed mean TTFT {m.get('mixed_mean_ttft_ms')} ms")


if __name__ == "__main__":
    main()
