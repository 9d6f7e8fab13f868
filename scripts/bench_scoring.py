"""Scoring + selection + page lists vs dense causal FA3, same run (H100).

    python scripts/bench_scoring.py --out benchmarks/results/scoring_h100.json

Checks the kernels against the float32 reference first, optionally sweeps scoring tile
configs (--tune), then times each case next to dense FA3 with triton.testing.do_bench in
--rounds interleaved rounds (ratios are medians of the rounds' ratios) and writes one record
per case plus a PNG beside the JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SHAPES, contiguous_kv, dense_fa3, line_plot, paged_inputs, step_keys, time_interleaved, write_records,
)

from vllm_xattn import reference as ref  # noqa: E402
from vllm_xattn.kernels import (  # noqa: E402
    antidiagonal_scores_paged, build_page_lists, masks_from_selection, plan_prefill,
    select_blocks_packed, serving_key_copy, unpack_scores,
)


def pipeline(q, kv_cache, block_table, plan, *, threshold, tiles=None, keys=None):
    """The per-layer work as serving runs it: what serving makes once per step or once per
    process (the thresholds tensor, the mini-requests' query offsets, the page-table buffer)
    is made here once, outside the timed calls. ``keys``: the layer's new keys, which serving
    hands to scoring (requests without context read them through TMA unless the plan copies)."""
    kw = dict(tiles or {}, keys=keys)
    hq = q.shape[1]
    tau = torch.full((hq,), threshold, dtype=torch.float32, device=q.device)
    cu = plan.mini_cu_seqlens_q(hq).to(q.device)
    page_table = torch.empty(hq * plan.total_q_blocks, plan.max_kb * (plan.block_size // kv_cache.shape[2]),
                             dtype=torch.int32, device=q.device)

    def scoring():
        return antidiagonal_scores_paged(q, kv_cache, block_table, plan, **kw)

    def select(a):
        return select_blocks_packed(a, plan, threshold=tau)

    def lists(counts, ids):
        return build_page_lists(counts, ids, block_table, kv_cache, plan, page_table=page_table,
                                cu_seqlens_q=cu)

    def run():
        counts, ids = select(scoring())
        return lists(counts, ids), counts

    return scoring, run, select, lists


def serving_plan(cu_q, seq_lens, stride, dims, key_copy, **tiles):
    """The plan as the builder makes it (``key_copy`` "serving": ``serving_key_copy``, with room
    for the longest request) or with every request's keys copied ("all")."""
    copy = (serving_key_copy(stride, dims["num_q_heads"], dims["num_kv_heads"], int(max(seq_lens)))
            if key_copy == "serving" else {})
    return plan_prefill(cu_q, seq_lens, block_size=128, stride=stride, **copy, **tiles)


def check_against_reference(shape, seq_lens, query_lens, stride, threshold, log, key_copy="serving"):
    """Scores (fp32 tolerance) and selections (exact but for near-ties) vs the reference, through
    the path the timed cases take (``serving_plan``, the step's own keys)."""
    dims = SHAPES[shape]
    q, kv, bt, cu_q, sl = paged_inputs(seq_lens, query_lens, **dims, seed=1)
    k, _ = contiguous_kv(kv, bt, sl)
    cu_k = torch.tensor([0] + sl.cumsum(0).tolist(), dtype=torch.int32)
    plan = serving_plan(cu_q, sl, stride, dims, key_copy).to("cuda")
    a = antidiagonal_scores_paged(q, kv, bt, plan, keys=step_keys(kv, bt, cu_q, sl, dims["num_q_heads"]))
    got = unpack_scores(a, plan)
    want = ref.antidiagonal_block_scores(q, k, cu_q.cuda(), cu_k.cuda(), stride=stride, block_size=128)
    err = max(((g - w).abs() / (w.abs() + 1e-3)).max().item() for g, w in zip(got, want))
    counts, ids = select_blocks_packed(a, plan, threshold=threshold)
    sel = masks_from_selection(counts, ids, plan)
    sel_ref = ref.select_blocks(want, threshold=threshold)
    sel_same = ref.select_blocks([w.cpu() for w in got], threshold=threshold)
    rows = sum(m.shape[0] * m.shape[1] for m in sel)
    diff_rows = sum((m.cpu() != r.cpu()).any(-1).sum().item() for m, r in zip(sel, sel_ref))
    same_input_diff = sum((m.cpu() != r).any(-1).sum().item() for m, r in zip(sel, sel_same))
    res = dict(shape=shape, seq_lens=seq_lens, query_lens=query_lens, stride=stride,
               keys_copied=plan.key_copy_rows > 0, direct_key_requests=plan.direct_key_requests,
               max_rel_score_err=err, selection_rows=rows,
               rows_differing_from_reference=diff_rows,
               rows_differing_on_same_scores=same_input_diff)
    log(f"check {res}")
    return res


# Scoring tiles (super-rows x super-columns), warps, pipeline stages. A first sweep over
# {64,128}^2 x {4,8} warps x {2,3} stages on the H100 put 128x128/8/3 first at S=8 and 16;
# larger tiles raise FLOPs per byte loaded from L2, which bounds this kernel.
# A second sweep: with BLOCK_D=128, 128x256 and 256x128 fit only 2 stages and were slower,
# so the candidates below also halve the D chunk (more stages fit).
# 128x256/8 warps/4 stages/D chunk 64 won that sweep (S=8: 1.33 ms, S=16: 0.68 ms at 32K,
# from 1.75 / 0.98 ms) and is the kernel's default; the third sweep probes around it.
# The third sweep (same file) left it first. A "flat" kernel (one pipelined loop over the
# off-diagonal key tiles) measured 16-25 % slower (benchmarks/results/scoring_variants_h100.json:
# ptxas serialises its wgmma for lack of registers) and was dropped.
# Since then the kernel takes work from a queue. Its tiles' loads (128 x 256: ~87 FLOPs per
# byte read from L2) add up to ~4.8 TB/s at S=8 / 32K, near the H100's L2 bandwidth, so it is
# likely L2-bound (inferred from bytes and time, not profiled). A fourth sweep (commit 3c1e448,
# benchmarks/results/logs/scoring_tune_h100_3c1e448.log) tried 256-row tiles: 256 x 256 does
# not compile (ptxas: its float32 accumulator alone is all 64K registers), 256 x 128 ran
# 1.93 ms vs 1.29 ms at S=8 and 1.03 vs 0.67 ms at S=16; 128 x 256 / 8 warps / 4 stages stays.
TUNE_CONFIGS = [  # (block_m, block_n, num_warps, num_stages, block_d)
    (128, 256, 8, 4, 64), (128, 256, 8, 4, 32), (128, 256, 8, 6, 32),
    (64, 256, 4, 4, 64), (64, 256, 8, 4, 64), (128, 256, 16, 4, 64), (64, 512, 8, 3, 64),
    (256, 128, 8, 4, 64), (256, 128, 16, 4, 64),
]


def tune(shape, seq_len, stride, threshold, log):
    dims = SHAPES[shape]
    q, kv, bt, cu_q, sl = paged_inputs([seq_len], [seq_len], **dims)
    best = None
    results = []
    for bm, bn, warps, stages, bd in TUNE_CONFIGS:
        try:
            plan = plan_prefill(cu_q, sl, block_size=128, stride=stride, block_m=bm, block_n=bn).to("cuda")
            scoring, *_ = pipeline(q, kv, bt, plan, threshold=threshold,
                                  tiles=dict(num_warps=warps, num_stages=stages, block_d=bd))
            ms = do_bench(scoring, warmup=5, rep=40)
        except Exception as e:  # out of shared memory / registers for this tile
            log(f"tune {bm}x{bn} w{warps} s{stages} d{bd}: {type(e).__name__}")
            continue
        results.append(dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                            block_d=bd, ms=ms))
        log(f"tune {shape} {seq_len} S={stride} {bm}x{bn} w{warps} s{stages} d{bd}: {ms:.3f} ms")
        if best is None or ms < best["ms"]:
            best = results[-1]
    return best, results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/scoring_h100.json")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=4, help="requests in the batched 32K case")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per case")
    ap.add_argument("--key-copy", choices=["serving", "all"], default="serving",
                    help="which requests scoring copies keys for (its TMA path): as the XATTN builder "
                         "plans (from key_copy_min_len keys; the default; a step that copies none reads "
                         "the keys of requests without context from the layer's own keys, as serving "
                         "does), or every one with a whole tile (the 0f754a6 run)")
    args = ap.parse_args()
    out = Path(args.out)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    checks = []
    if not args.skip_check:
        for shape in args.shapes:
            for stride in args.strides:
                checks.append(check_against_reference(shape, [8192], [8192], stride, args.threshold, log,
                                                      args.key_copy))
                # several requests, context before the queries, partial blocks
                checks.append(check_against_reference(shape, [5000, 9000, 3333], [5000, 2900, 1000],
                                                      stride, args.threshold, log, args.key_copy))

    tiles = {}
    tuning = {}
    if args.tune:  # on the Llama shape; the Qwen shape uses the kernel's defaults
        for stride in args.strides:
            best, allres = tune("llama-3.1-8b", 32768, stride, args.threshold, log)
            tiles[("llama-3.1-8b", stride)] = best
            tuning[f"llama-3.1-8b/S{stride}"] = allres

    records = []
    cases = [(s, [n], [n]) for n in args.seq_lens for s in args.shapes]
    if args.batch > 1:
        cases += [(s, [32768] * args.batch, [32768] * args.batch) for s in args.shapes]
    for shape, seq_lens, query_lens in cases:
        dims = SHAPES[shape]
        q, kv, bt, cu_q, sl = paged_inputs(seq_lens, query_lens, **dims)
        dense = dense_fa3(q, kv, bt, cu_q, sl)
        keys = step_keys(kv, bt, cu_q, sl, dims["num_q_heads"])
        for stride in args.strides:
            best = tiles.get((shape, stride)) or {}
            t0 = time.perf_counter()
            plan = serving_plan(cu_q, sl, stride, dims, args.key_copy, block_m=best.get("block_m"),
                                block_n=best.get("block_n")).to(q.device)
            plan_ms = (time.perf_counter() - t0) * 1e3
            launch = {k: best[k] for k in ("num_warps", "num_stages", "block_d") if k in best}
            scoring, run, select, make_lists = pipeline(q, kv, bt, plan, threshold=args.threshold,
                                                        tiles=launch, keys=keys)
            lists, counts = run()
            cand = plan.causal_blocks() * dims["num_q_heads"]
            density = counts.sum().item() / cand
            a = scoring()
            counts, ids = select(a)
            # Dense FA3 and the pipeline (and its parts) in interleaved rounds: the ratio is the
            # median of the rounds' ratios, so dense FA3's own drift (+-3 % between runs) lands
            # on both sides.
            times = time_interleaved({"dense": dense, "run": run, "scoring": scoring,
                                      "selection": lambda a=a: select(a),
                                      "lists": lambda c=counts, i=ids: make_lists(c, i)},
                                     rounds=args.rounds, rep=50)
            ms, score_ms, select_ms, lists_ms, dense_ms = (
                median(times[k]) for k in ("run", "scoring", "selection", "lists", "dense"))
            rec = dict(shape=shape, seq_len=seq_lens[0], batch=len(seq_lens), stride=stride,
                       threshold=args.threshold, inputs="random", ms=ms, scoring_ms=score_ms,
                       dense_fa3_ms=dense_ms,
                       ratio=median([t / td for t, td in zip(times["run"], times["dense"])]),
                       scoring_ratio=median([t / td for t, td in zip(times["scoring"], times["dense"])]),
                       selection_ms=select_ms, page_lists_ms=lists_ms, density=density,
                       plan_host_ms=plan_ms, rounds=args.rounds, round_ms=times,
                       key_copy=args.key_copy, keys_copied=plan.key_copy_rows > 0,
                       direct_key_requests=0 if plan.key_copy_rows else plan.direct_key_requests,
                       tiles=dict(block_m=plan.block_m, block_n=plan.block_n, **launch), **dims)
            records.append(rec)
            log(f"{shape:13s} N={seq_lens[0]:6d}x{len(seq_lens)} S={stride:2d}: xattn {ms:8.3f} ms "
                f"(scoring {score_ms:8.3f}, selection {select_ms:.3f}, lists {lists_ms:.3f}) dense {dense_ms:8.3f} ms ratio {rec['ratio']:.3f} "
                f"density {density:.3f}")
            del lists, a, counts, ids
        del q, kv, keys
        torch.cuda.empty_cache()

    cmd = "python scripts/bench_scoring.py " + " ".join(sys.argv[1:])
    write_records(out, records, cmd)
    extra = out.with_name(out.stem + "_checks.json")
    write_records(extra, checks + [{"tuning": tuning}], cmd)
    plot(records, out.with_suffix(".png"))
    print("\n| shape | N x batch | S | xattn ms | scoring ms | dense FA3 ms | ratio | density |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['shape']} | {r['seq_len']}x{r['batch']} | {r['stride']} | {r['ms']:.3f} | "
              f"{r['scoring_ms']:.3f} | {r['dense_fa3_ms']:.3f} | {r['ratio']:.3f} | {r['density']:.3f} |")


def plot(records, path):
    series = {f"{shape} S={stride}": [(r["seq_len"], r["ratio"]) for r in records
                                      if r["shape"] == shape and r["stride"] == stride
                                      and r["batch"] == 1]
              for shape in SHAPES for stride in sorted({r["stride"] for r in records})}
    line_plot(path, series, xlabel="sequence length",
              ylabel="(scoring + selection + page lists) / dense FA3", hlines=(0.08, 0.05))

if __name__ == "__main__":
    main()
