"""Per-layer attention time of XATTN (scoring + selection + page lists + execution) vs dense
causal FA3, same run (H100), for each block-sparse executor (``--executor``, default both).

    python scripts/bench_attention.py --out benchmarks/results/attention_h100.json

Densities are controlled with ratio selection (5 / 10 / 20 % of the causal blocks) and also
come from threshold selection on the inputs. Random inputs attend nearly uniformly, so the
threshold cases here are dense-ish; ``--capture DIR`` (a ``scripts/capture_qkv.py`` folder)
adds every ``--layer-step``-th captured layer of a real model at ``--capture-thresholds``
(0.9 / 0.95), i.e. at the real model's densities. Records carry
the executor (``fa3`` / ``flashinfer``), its kernel time alone on the same page lists and its
effective TFLOP/s on the selected blocks next to dense FA3's, and the executor's host plan time
per scheduler step (``plan_ms``: FlashInfer's ``plan()``; FA3 plans nothing). Dense FA3, the
layer and the executor are timed in ``--rounds`` interleaved rounds per case; ``speedup`` and
the executor's share of dense throughput are medians of the ratios within each round (single
do_bench calls per case had moved the share by up to 0.15 between runs).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SHAPES, captured_layers, causal_flops, dense_fa3, line_plot, paged_inputs, shape_name, step_keys,
    time_interleaved, write_records,
)

from vllm_xattn.backends.executors import FA3, FlashInferExecutor  # noqa: E402
from vllm_xattn.backends.sparse_prefill import ScratchPool, SparsePrefill, SparseStep  # noqa: E402
from vllm_xattn.config import XAttnConfig  # noqa: E402
from vllm_xattn.kernels import (  # noqa: E402
    antidiagonal_scores_paged, build_page_lists, plan_prefill, select_blocks_packed, serving_key_copy,
)


def executor_flops(lists, hq_per_mini: int, head_dim: int) -> float:
    """FLOPs the executor computes: bottom-right causal rows over each mini-request's keys."""
    if lists.seqused_q is not None:  # another order than the layout's: starts are unsorted
        tq = lists.seqused_q.double()
    else:
        cu = lists.cu_seqlens_q.long()
        tq = (cu[1:] - cu[:-1]).double()
    kv = lists.seqused_k[: tq.numel()].double()
    pairs = tq * (kv - tq) + tq * (tq + 1) / 2
    return float(4.0 * head_dim * hq_per_mini * pairs.sum())


def bench_inputs(q, kv, bt, cu_q, sl, *, shape: str, inputs: str, settings: list[dict], args) -> list[dict]:
    """Records of one prefill (one request, no context) for each selection setting and
    executor: the layer, the executor alone and dense FA3 in interleaved rounds."""
    n, hq, d = q.shape
    hkv = kv.shape[1]
    dims = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    records = []
    dense = dense_fa3(q, kv, bt, cu_q, sl)
    dense_fl = causal_flops([n], [n], hq, d)
    # as the builder plans (keys copied from key_copy_min_len), with the layer's new keys handed
    # to scoring as serving does: a fresh prompt's whole tiles read them through TMA
    host_plan = plan_prefill(cu_q, sl, block_size=128, stride=args.stride,
                             **serving_key_copy(args.stride, hq, hkv, n))
    keys = step_keys(kv, bt, cu_q, sl, hq)
    pool = ScratchPool(max_tokens=n, max_reqs=1, max_seq_len=n, num_q_heads=hq, head_dim=d,
                       dtype=q.dtype, cfg=XAttnConfig(stride=args.stride), page_size=args.page_size,
                       device=q.device, executor="flashinfer" if "flashinfer" in args.executor else "fa3",
                       num_kv_heads=hkv)
    # Selection heads: one mini-request per query head, or per KV group of G heads.
    group = hq // hkv if args.granularity == "kv_group" else 1
    sel_heads = hq // group
    steps, plan_ms = {}, {}
    for name in args.executor:
        ex = FA3 if name == "fa3" else FlashInferExecutor(
            num_q_heads=hq, head_dim=d, page_size=args.page_size, q_dtype=q.dtype,
            kv_dtype=kv.dtype)
        times = []
        for _ in range(3):  # once per scheduler step in serving; the first may build / load
            t0 = time.perf_counter()
            steps[name] = SparseStep.from_host_plan(host_plan, block_table=bt, tok_start=0,
                                                    tok_end=n, selection_heads=sel_heads, device=q.device,
                                                    executor=ex)
            times.append((time.perf_counter() - t0) * 1e3)
        plan_ms[name] = min(times[1:])
    plan = steps[args.executor[0]].plan
    cand = plan.causal_blocks() * hq
    qh = q.view(n, sel_heads, group, d).transpose(0, 1).contiguous().view(sel_heads * n, group, d)
    oh = torch.empty_like(qh)
    for sel in settings:
        cfg = XAttnConfig(stride=args.stride, granularity=args.granularity, **sel)
        sp = SparsePrefill(cfg, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                           scale=d ** -0.5, thresholds=None)
        # The selection both executors run (deterministic), and its FLOPs.
        a = antidiagonal_scores_paged(q, kv, bt, plan)
        counts, ids = select_blocks_packed(a, plan, mode=cfg.selection,
                                              threshold=cfg.threshold, ratio=cfg.ratio,
                                              granularity=cfg.granularity, num_kv_heads=hkv)
        ex_fl = executor_flops(build_page_lists(counts, ids, bt, kv, plan, granularity=cfg.granularity,
                                                num_kv_heads=hkv), group, d)
        for name, step in steps.items():
            o = torch.empty_like(q)
            density = int(sp.run(q, kv, step, o, pool, keys=keys).sum()) / cand

            def run_layer(q=q, kv=kv, step=step, o=o, pool=pool, keys=keys):  # bound now: the loop del's them later
                return sp.run(q, kv, step, o, pool, keys=keys)

            # The executor's kernels alone on the same page lists (built before each launch),
            # the whole layer and dense FA3, timed in interleaved rounds.
            fns = {"dense": dense, "layer": run_layer}
            for i, launch in enumerate(step.executor.launches(
                    qh, oh, counts, ids, kv, step, pool, granularity=cfg.granularity,
                    num_kv_heads=hkv, scale=d ** -0.5)):
                fns[f"exec{i}"] = launch
            times = time_interleaved(fns, rounds=args.rounds)
            rounds_dense, rounds_layer = times.pop("dense"), times.pop("layer")
            rounds_exec = [sum(ts) for ts in zip(*times.values())]
            total_ms, exec_ms, round_dense_ms = median(rounds_layer), median(rounds_exec), median(rounds_dense)
            rec = dict(shape=shape, seq_len=n, executor=name, granularity=cfg.granularity,
                       stride=args.stride, page_size=args.page_size, inputs=inputs,
                       selection=cfg.selection, threshold=cfg.threshold if cfg.selection == "threshold" else None,
                       ratio=cfg.ratio, density=density, ms=total_ms, executor_ms=exec_ms,
                       plan_ms=plan_ms[name], dense_fa3_ms=round_dense_ms,
                       # medians of the ratios taken within each round
                       speedup=median([td / t for td, t in zip(rounds_dense, rounds_layer)]),
                       effective_tflops=ex_fl / exec_ms / 1e9,
                       dense_tflops=dense_fl / round_dense_ms / 1e9,
                       executor_share_of_dense_throughput=median(
                           [(ex_fl / te) / (dense_fl / td) for td, te in zip(rounds_dense, rounds_exec)]),
                       rounds=args.rounds, round_ms=dict(dense=rounds_dense, layer=rounds_layer,
                                                         executor=rounds_exec),
                       **dims)
            records.append(rec)
            if args.profile:
                profile_layer(Path(args.profile) / f"profile_{shape}_{inputs.replace(' ', '_')}_{n}_{name}_{cfg.selection}"
                              f"{cfg.ratio if cfg.selection == 'ratio' else cfg.threshold}.txt",
                              run_layer)
            print(f"{shape:13s} N={n:6d} {name:10s} {cfg.selection:9s} density {density:.3f}: "
                  f"xattn {total_ms:8.3f} ms (exec {exec_ms:8.3f}, {rec['effective_tflops']:.0f} TF/s, "
                  f"plan {plan_ms[name]:.2f} ms/step) dense {round_dense_ms:8.3f} ms "
                  f"({rec['dense_tflops']:.0f} TF/s) speedup {rec['speedup']:.2f}x", flush=True)
        del a, counts, ids
    return records


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attention_h100.json")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.9])
    ap.add_argument("--stride", type=int, default=XAttnConfig().stride)
    ap.add_argument("--executor", nargs="+", choices=["fa3", "flashinfer"], default=["fa3", "flashinfer"])
    ap.add_argument("--granularity", choices=["head", "kv_group"], default="head",
                    help="mini-requests per query head (default) or per KV group")
    ap.add_argument("--page-size", type=int, default=16, help="KV cache page size (divides 128)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved timing rounds of dense FA3, the layer and the executor per case")
    ap.add_argument("--capture", metavar="DIR",
                    help="also time the layers of a scripts/capture_qkv.py folder (real Q/K/V)")
    ap.add_argument("--layer-step", type=int, default=4, help="with --capture: every n-th layer")
    ap.add_argument("--capture-thresholds", type=float, nargs="+", default=[0.9, 0.95],
                    help="with --capture: threshold selection at these thresholds")
    ap.add_argument("--profile", metavar="DIR",
                    help="also write a torch.profiler kernel table of one layer call per case here")
    args = ap.parse_args()
    out = Path(args.out)
    records = []
    settings = [dict(selection="ratio", ratio=r) for r in args.ratios]
    settings += [dict(threshold=t) for t in args.thresholds]
    for shape in args.shapes:
        for n in args.seq_lens:
            inputs = paged_inputs([n], [n], **SHAPES[shape], page_size=args.page_size)
            records += bench_inputs(*inputs, shape=shape, inputs="random", settings=settings, args=args)
            del inputs
            torch.cuda.empty_cache()
    if args.capture:  # real attention: threshold selection at the real model's densities
        settings = [dict(threshold=t) for t in args.capture_thresholds]
        for name, *inputs in captured_layers(args.capture, args.layer_step, page_size=args.page_size):
            q = inputs[0]
            records += bench_inputs(*inputs, shape=shape_name(q.shape[1], inputs[1].shape[1], q.shape[2]),
                                    inputs=f"captured {name}", settings=settings, args=args)
            del inputs, q
            torch.cuda.empty_cache()
    write_records(out, records, "python scripts/bench_attention.py " + " ".join(sys.argv[1:]))
    plot(records, out.with_suffix(".png"))
    print("\n| shape | N | executor | selection | density | xattn ms | exec ms | exec TF/s | plan ms/step "
          "| dense ms | dense TF/s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        sel = f"ratio {r['ratio']}" if r["selection"] == "ratio" else f"tau {r['threshold']}"
        print(f"| {r['shape']} | {r['seq_len']} | {r['executor']} | {sel} | {r['density']:.3f} | {r['ms']:.3f} | "
              f"{r['executor_ms']:.3f} | {r['effective_tflops']:.0f} | {r['plan_ms']:.2f} | "
              f"{r['dense_fa3_ms']:.3f} | {r['dense_tflops']:.0f} | {r['speedup']:.2f}x |")


def profile_layer(path: Path, fn, reps: int = 5) -> None:
    """Per-kernel GPU time of ``reps`` layer calls (where the fixed per-layer cost goes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{reps} calls\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def plot(records, path):
    series = {f"{shape} {int(ratio * 100)} % {ex}": [
                  (r["seq_len"], r["speedup"]) for r in records
                  if r["shape"] == shape and r["ratio"] == ratio and r.get("executor", "fa3") == ex]
              for shape in SHAPES for ratio in sorted({r["ratio"] for r in records if r["ratio"]})
              for ex in sorted({r.get("executor", "fa3") for r in records})}
    line_plot(path, series, xlabel="sequence length", ylabel="speedup vs dense FA3 (per layer)",
              hlines=(1.0,))

if __name__ == "__main__":
    main()
