"""Long-context accuracy through the OpenAI-compatible server: FLASH_ATTN vs XATTN settings.

    python scripts/eval_longctx.py --model QWEN_HF_DIR --haystack pg_essays.txt \
        --out benchmarks/results/accuracy_h100.json

For each setting a `vllm serve` is started on loopback, then: needle in a haystack (lengths x
depths x needles, /v1/chat/completions, greedy), multi-key retrieval (several needles, one
asked), and next-token agreement with the dense run on real text windows (/v1/completions
with prompt_logprobs: top-1 agreement and mean |delta logprob| of the prompt tokens).
Requests go out concurrently, so the server batches them (continuous batching, mixed
prefill / decode). The density is the one the server's sparse layers really ran at
(XATTN_DENSITY_LOG), over all probes of the setting, overall and per layer.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import line_plot, write_records  # noqa: E402
from longctx_tasks import build_probes, is_correct  # noqa: E402
from serve_util import backend_args, measured_density, post, vllm_server  # noqa: E402

from vllm_xattn.backends.density_log import ENV_VAR  # noqa: E402
from vllm_xattn.config import XAttnConfig  # noqa: E402


def parse_setting(text: str) -> dict:
    """'dense' or a JSON object of xattn knobs, e.g. '{"stride": 16, "threshold": 0.95}'."""
    return {} if text == "dense" else json.loads(text)


def is_default(setting: str) -> bool:
    """Whether a setting runs the default configuration (min_sparse_tokens aside: the
    evaluation lowers it so that every length runs sparse)."""
    if setting == "dense":
        return False
    knobs = {k: v for k, v in parse_setting(setting).items() if k != "min_sparse_tokens"}
    return XAttnConfig(**knobs) == XAttnConfig()


def run_needles(url, model, probes, workers):
    def ask(p):
        r = post(url, "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": p.text}],
            "temperature": 0, "max_tokens": 16})
        return is_correct(r["choices"][0]["message"]["content"], p.answer)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(ask, probes))


def run_prompt_logprobs(url, model, windows, workers):
    """Per window: per prompt position, (top-1 token id, logprob of the actual token)."""
    def score(ids):
        r = post(url, "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1,
                                          "temperature": 0, "prompt_logprobs": 1})
        out = []
        for tok, entry in zip(ids[1:], r["choices"][0]["prompt_logprobs"][1:]):
            top = min(entry.items(), key=lambda kv: kv[1]["rank"])[0]
            out.append((int(top), entry[str(tok)]["logprob"]))
        return out

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(score, windows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--haystack", required=True, help="long text (e.g. the Paul Graham essays)")
    ap.add_argument("--out", default="benchmarks/results/accuracy_h100.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32000])
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--settings", nargs="+", default=[
        "dense", "{}", '{"threshold": 0.95}', '{"threshold": 0.9}', '{"stride": 8}'])
    ap.add_argument("--min-sparse-tokens", type=int, default=4096,
                    help="for the XATTN settings, so that every probe length runs sparse")
    ap.add_argument("--windows", type=int, default=4, help="text windows for agreement")
    ap.add_argument("--window-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--log-dir", default="/tmp/eval_longctx")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    text = open(args.haystack).read()
    depths = [i / (args.depths - 1) for i in range(args.depths)]
    probes = build_probes(tok, text, lengths=args.lengths, depths=depths, needles=[0, 1, 2],
                          multi_keys=3)
    ids = tok.encode(text, add_special_tokens=False)
    step = max(1, (len(ids) - args.window_tokens) // max(1, args.windows))
    windows = [ids[i * step: i * step + args.window_tokens] for i in range(args.windows)]
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)

    results = {}
    for name in args.settings:
        knobs = parse_setting(name)
        if name != "dense":
            knobs = {"min_sparse_tokens": args.min_sparse_tokens, **knobs}
        server_args = [*backend_args(None if name == "dense" else knobs),
                       "--max-model-len", str(args.max_model_len),
                       "--gpu-memory-utilization", "0.85"]
        log = Path(args.log_dir) / f"serve-{len(results)}.log"
        density_dir = Path(args.log_dir) / f"density-{len(results)}"
        shutil.rmtree(density_dir, ignore_errors=True)
        with vllm_server(args.model, server_args, log, env={ENV_VAR: str(density_dir)}) as url:
            ok = run_needles(url, args.model, probes, args.workers)
            density, totals = measured_density(url, args.model, density_dir,
                                               dict(selected=0, candidates=0))
            lp = run_prompt_logprobs(url, args.model, windows, args.workers)
        per_layer = totals["per_layer"]  # over the probes, like ``density``
        results[name] = dict(knobs=knobs, ok=ok, logprobs=lp, density=density, per_layer=per_layer)
        print(f"{name}: needle acc {sum(ok) / len(ok):.3f}, density {density}", flush=True)

    dense = results.get("dense")
    records = []
    for name, res in results.items():
        single = [o for o, p in zip(res["ok"], probes) if p.keys == 1]
        multi = [o for o, p in zip(res["ok"], probes) if p.keys > 1]
        rec = dict(setting=name, knobs=res["knobs"], default=is_default(name),
                   density=1.0 if name == "dense" else res["density"],
                   density_per_layer=res["per_layer"],
                   needle_acc=100.0 * sum(single) / len(single),
                   multikey_acc=100.0 * sum(multi) / max(1, len(multi)),
                   by_length={L: 100.0 * sum(o for o, p in zip(res["ok"], probes)
                                             if p.keys == 1 and p.length == L)
                              / sum(1 for p in probes if p.keys == 1 and p.length == L)
                              for L in args.lengths},
                   by_depth_length=[(p.length, p.depth, o) for o, p in zip(res["ok"], probes)
                                    if p.keys == 1])
        if dense is not None:
            d_single = [o for o, p in zip(dense["ok"], probes) if p.keys == 1]
            rec["needle_acc_dense"] = 100.0 * sum(d_single) / len(d_single)
            rec["needle_gap_points"] = rec["needle_acc_dense"] - rec["needle_acc"]
            pairs = [(a, b) for wa, wb in zip(res["logprobs"], dense["logprobs"])
                     for a, b in zip(wa, wb)]
            rec["top1_agreement"] = sum(a[0] == b[0] for a, b in pairs) / len(pairs)
            rec["mean_abs_delta_logprob"] = sum(abs(a[1] - b[1]) for a, b in pairs) / len(pairs)
        records.append(rec)
        print({k: v for k, v in rec.items() if k != "by_depth_length"}, flush=True)
    out = Path(args.out)
    write_records(out, records, "python scripts/eval_longctx.py " + " ".join(sys.argv[1:]))
    plot_depth_length(out.with_name(out.stem + "_needles.png"), records, args.lengths, depths)
    line_plot(out.with_name(out.stem + "_density_per_layer.png"),
              {r["setting"]: [(int(k), v) for k, v in r["density_per_layer"].items()]
               for r in records if r["density_per_layer"]},
              xlabel="layer", ylabel="density (selected / causal blocks)", log2_x=False)


def plot_depth_length(path: Path, records: list[dict], lengths: list[int], depths: list[float]):
    """Needle accuracy (mean over needles) per (length, depth), one panel per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(3.2 * len(records), 3), squeeze=False)
    for ax, rec in zip(axes[0], records):
        grid = [[0.0] * len(depths) for _ in lengths]
        n = [[0] * len(depths) for _ in lengths]
        for length, depth, ok in rec["by_depth_length"]:
            i, j = lengths.index(length), min(range(len(depths)), key=lambda k: abs(depths[k] - depth))
            grid[i][j] += ok
            n[i][j] += 1
        acc = [[g / max(1, c) for g, c in zip(gr, cr)] for gr, cr in zip(grid, n)]
        ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_xticks(range(len(depths)), [f"{d:.1f}" for d in depths], fontsize=6)
        ax.set_title(f"{rec['setting']}\n{rec['needle_acc']:.0f}% (density {rec['density']:.2f})",
                     fontsize=7)
        ax.set_xlabel("depth")
    axes[0][0].set_ylabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
