"""Per-layer attention time of XATTN (scoring + selection + page lists + execution) vs dense
causal FA3, same run (H100).

    python scripts/bench_attention.py --out benchmarks/results/attention_h100.json

Densities are controlled with ratio selection (5 / 10 / 20 % of the causal blocks) and also
come from threshold selection on the inputs. Random inputs attend nearly uniformly, so the
threshold cases here are dense-ish; real-model densities need captured Q/K. Records carry
the executor's effective TFLOP/s on the selected blocks next to dense FA3's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SHAPES, causal_flops, dense_fa3, line_plot, paged_inputs, write_records,
)

from vllm_xattn.backends.sparse_prefill import ScratchPool, SparsePrefill, SparseStep  # noqa: E402
from vllm_xattn.config import XAttnConfig  # noqa: E402
from vllm_xattn.kernels import (  # noqa: E402
    antidiagonal_scores_paged, build_page_lists, folded_kv_views, plan_prefill,
    select_blocks_packed,
)


def executor_flops(lists, hq_per_mini: int, head_dim: int) -> float:
    """FLOPs the executor computes: bottom-right causal rows over each mini-request's keys."""
    cu = lists.cu_seqlens_q.long()
    tq = (cu[1:] - cu[:-1]).double()
    kv = lists.seqused_k[: tq.numel()].double()
    pairs = tq * (kv - tq) + tq * (tq + 1) / 2
    return float(4.0 * head_dim * hq_per_mini * pairs.sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attention_h100.json")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.9])
    ap.add_argument("--stride", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    records = []
    for shape in args.shapes:
        dims = SHAPES[shape]
        hq, hkv, d = dims["num_q_heads"], dims["num_kv_heads"], dims["head_dim"]
        for n in args.seq_lens:
            q, kv, bt, cu_q, sl = paged_inputs([n], [n], **dims)
            dense_ms = do_bench(dense_fa3(q, kv, bt, cu_q, sl), warmup=3, rep=60)
            dense_fl = causal_flops([n], [n], hq, d)
            step = SparseStep.from_host_plan(
                plan_prefill(cu_q, sl, block_size=128, stride=args.stride), block_table=bt,
                tok_start=0, tok_end=n, selection_heads=hq, device="cuda")
            plan = step.plan
            settings = [dict(selection="ratio", ratio=r) for r in args.ratios]
            settings += [dict(threshold=t) for t in args.thresholds]
            pool = None
            for sel in settings:
                cfg = XAttnConfig(stride=args.stride, **sel)
                pool = pool or ScratchPool(max_tokens=n, max_reqs=1, max_seq_len=n, num_q_heads=hq,
                                           head_dim=d, dtype=q.dtype, cfg=cfg, page_size=16,
                                           device=q.device)
                sp = SparsePrefill(cfg, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                   scale=d ** -0.5, thresholds=None)
                o = torch.empty_like(q)
                n_sel = int(sp.run(q, kv, step, o, pool))
                cand = sum(i + 1 for i in plan.row_block.tolist()) * hq
                density = n_sel / cand
                total_ms = do_bench(lambda: sp.run(q, kv, step, o, pool), warmup=3, rep=60)
                # The executor alone, on the same page lists.
                a = antidiagonal_scores_paged(q, kv, bt, plan)
                counts, ids, _ = select_blocks_packed(a, plan, mode=cfg.selection,
                                                      threshold=cfg.threshold, ratio=cfg.ratio)
                lists = build_page_lists(counts, ids, bt, kv, plan)
                kp, vp, _ = folded_kv_views(kv)
                qh = q.transpose(0, 1).contiguous().view(hq * n, 1, d)
                oh = torch.empty_like(qh)
                from vllm.vllm_flash_attn import flash_attn_varlen_func

                def execute():
                    flash_attn_varlen_func(
                        q=qh, k=kp, v=vp, cu_seqlens_q=lists.cu_seqlens_q, max_seqlen_q=128,
                        seqused_k=lists.seqused_k, max_seqlen_k=lists.max_seqlen_k,
                        softmax_scale=d ** -0.5, causal=True, block_table=lists.page_table,
                        fa_version=3, out=oh)

                exec_ms = do_bench(execute, warmup=3, rep=60)
                ex_fl = executor_flops(lists, 1, d)
                rec = dict(shape=shape, seq_len=n, executor="fa3", granularity="head",
                           stride=args.stride, page_size=16, inputs="random",
                           selection=cfg.selection, threshold=cfg.threshold if cfg.selection == "threshold" else None,
                           ratio=cfg.ratio, density=density, ms=total_ms, executor_ms=exec_ms,
                           dense_fa3_ms=dense_ms, speedup=dense_ms / total_ms,
                           effective_tflops=ex_fl / exec_ms / 1e9,
                           dense_tflops=dense_fl / dense_ms / 1e9,
                           executor_share_of_dense_throughput=(ex_fl / exec_ms) / (dense_fl / dense_ms),
                           **dims)
                records.append(rec)
                print(f"{shape:13s} N={n:6d} {cfg.selection:9s} density {density:.3f}: xattn {total_ms:8.3f} ms "
                      f"(exec {exec_ms:8.3f}, {rec['effective_tflops']:.0f} TF/s) dense {dense_ms:8.3f} ms "
                      f"({rec['dense_tflops']:.0f} TF/s) speedup {rec['speedup']:.2f}x", flush=True)
                del lists, a, counts, ids
            del q, kv, pool
            torch.cuda.empty_cache()
    write_records(out, records, "python scripts/bench_attention.py " + " ".join(sys.argv[1:]))
    plot(records, out.with_suffix(".png"))
    print("\n| shape | N | selection | density | xattn ms | exec TF/s | dense ms | dense TF/s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        sel = f"ratio {r['ratio']}" if r["selection"] == "ratio" else f"tau {r['threshold']}"
        print(f"| {r['shape']} | {r['seq_len']} | {sel} | {r['density']:.3f} | {r['ms']:.3f} | "
              f"{r['effective_tflops']:.0f} | {r['dense_fa3_ms']:.3f} | {r['dense_tflops']:.0f} | "
              f"{r['speedup']:.2f}x |")


def plot(records, path):
    series = {f"{shape} {int(ratio * 100)} %": [(r["seq_len"], r["speedup"]) for r in records
                                               if r["shape"] == shape and r["ratio"] == ratio]
              for shape in SHAPES for ratio in sorted({r["ratio"] for r in records if r["ratio"]})}
    line_plot(path, series, xlabel="sequence length", ylabel="speedup vs dense FA3 (per layer)",
              hlines=(1.0,))

if __name__ == "__main__":
    main()
