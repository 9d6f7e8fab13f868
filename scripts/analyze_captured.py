"""Score, select and execute on Q/K/V captured from a real model (scripts/capture_qkv.py).

    python scripts/analyze_captured.py --capture /tmp/cap --out benchmarks/results/scoring_real_h100.json

Per layer and (stride, threshold): the kernels' scores against the float32 reference, their
selection against the reference's selection on the reference's scores (rows that differ:
near-ties), the density, and the time of scoring + selection + page lists next to dense
FA3 on the same inputs. At S=8, tau=0.9 the sparse path's output (FA3 executor) is checked
against the reference block-sparse attention on the last query blocks. Writes a density-per-
layer PNG beside the JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import dense_fa3, line_plot, write_records  # noqa: E402

from vllm_xattn import reference as ref  # noqa: E402
from vllm_xattn.backends.sparse_prefill import ScratchPool, SparsePrefill, SparseStep  # noqa: E402
from vllm_xattn.config import XAttnConfig  # noqa: E402
from vllm_xattn.kernels import (  # noqa: E402
    antidiagonal_scores_paged, build_page_lists, make_paged_cache, masks_from_selection,
    plan_prefill, select_blocks_packed, unpack_scores,
)

CHECK_ROWS = 2048  # queries (16 blocks) whose output is compared with the reference


def analyze_layer(path, settings, dense_ms_cache, timing: bool):
    cap = torch.load(path)
    q, k, v = (cap[x].cuda() for x in ("q", "k", "v"))
    n, hq, d = q.shape
    hkv = k.shape[1]
    cu_q = torch.tensor([0, n], dtype=torch.int32)
    kv, bt = make_paged_cache(k, v, cu_q, 16, generator=torch.Generator().manual_seed(0))
    if "dense" not in dense_ms_cache and timing:
        dense_ms_cache["dense"] = do_bench(dense_fa3(q, kv, bt, cu_q, torch.tensor([n], dtype=torch.int32)), rep=50)
    recs = []
    for stride, tau in settings:
        plan = plan_prefill(cu_q, [n], block_size=128, stride=stride).to("cuda")
        a = antidiagonal_scores_paged(q, kv, bt, plan)
        want = ref.antidiagonal_block_scores(q, k, cu_q.cuda(), cu_q.cuda(), stride=stride,
                                             block_size=128)[0]
        got = unpack_scores(a, plan)[0]
        err = ((got - want).abs() / (want.abs() + 1e-3)).max().item()
        counts, ids = select_blocks_packed(a, plan, threshold=tau)
        mask = masks_from_selection(counts, ids, plan)[0]
        mask_ref = ref.select_blocks([want], threshold=tau)[0].cpu()
        rows_diff = int((mask != mask_ref).any(-1).sum())
        cand = plan.causal_blocks() * hq
        rec = dict(layer=cap["layer"], stride=stride, threshold=tau, seq_len=n,
                   density=int(counts.sum()) / cand, max_rel_score_err=err,
                   selection_rows=mask.shape[0] * mask.shape[1],
                   rows_differing_from_reference=rows_diff)
        if timing:
            def run():
                aa = antidiagonal_scores_paged(q, kv, bt, plan)
                c, i = select_blocks_packed(aa, plan, threshold=tau)
                return build_page_lists(c, i, bt, kv, plan)
            rec["ms"] = do_bench(run, rep=50)
            rec["dense_fa3_ms"] = dense_ms_cache["dense"]
            rec["ratio"] = rec["ms"] / rec["dense_fa3_ms"]
        if (stride, tau) == (8, 0.9):
            cfg = XAttnConfig(stride=8, threshold=0.9)
            pool = ScratchPool(max_tokens=n, max_reqs=1, max_seq_len=n, num_q_heads=hq, head_dim=d,
                               dtype=q.dtype, cfg=cfg, page_size=16, device=q.device, num_kv_heads=hkv)
            out = torch.empty_like(q)
            SparsePrefill(cfg, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5,
                          thresholds=None).run(q, kv, SparseStep(plan, bt, 0, n), out, pool)
            rows = CHECK_ROWS // 128
            want_out = ref.block_sparse_attention(
                q[-CHECK_ROWS:].float(), k.float(), v.float(),
                torch.tensor([0, CHECK_ROWS], device="cuda"), torch.tensor([0, n], device="cuda"),
                [mask[:, -rows:].cuda()], block_size=128)
            rec["output_rel_err_last_blocks"] = (
                (out[-CHECK_ROWS:].float() - want_out).norm() / want_out.norm()).item()
        recs.append(rec)
    return recs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--capture", required=True)
    ap.add_argument("--out", default="benchmarks/results/scoring_real_h100.json")
    ap.add_argument("--model-name", default="qwen2.5-0.5b")
    ap.add_argument("--timing-layers", type=int, default=4, help="time this many layers")
    args = ap.parse_args()
    settings = [(8, 0.9), (8, 0.95), (16, 0.9), (16, 0.95)]
    files = sorted(Path(args.capture).glob("layer_*.pt"))
    records, dense = [], {}
    for li, f in enumerate(files):
        for r in analyze_layer(f, settings, dense, timing=li < args.timing_layers):
            r.update(shape=args.model_name, inputs=f"{args.model_name}-captured")
            records.append(r)
            print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
    summary = []
    for stride, tau in settings:
        rs = [r for r in records if (r["stride"], r["threshold"]) == (stride, tau)]
        timed = [r for r in rs if "ratio" in r]
        summary.append(dict(
            stride=stride, threshold=tau, layers=len(rs),
            mean_density=sum(r["density"] for r in rs) / len(rs),
            rows_differing=sum(r["rows_differing_from_reference"] for r in rs),
            rows=sum(r["selection_rows"] for r in rs),
            mean_ratio_timed_layers=(sum(r["ratio"] for r in timed) / len(timed)) if timed else None))
    write_records(Path(args.out), records + [{"summary": summary}],
                  "python scripts/analyze_captured.py " + " ".join(sys.argv[1:]))
    plot(records, Path(args.out).with_suffix(".png"))
    print("\n| S | tau | mean density | rows differing / rows | ratio (timed layers) |")
    print("|---|---|---|---|---|")
    for s in summary:
        ratio = f"{s['mean_ratio_timed_layers']:.3f}" if s["mean_ratio_timed_layers"] else "-"
        print(f"| {s['stride']} | {s['threshold']} | {s['mean_density']:.3f} | "
              f"{s['rows_differing']} / {s['rows']} | {ratio} |")


def plot(records, path):
    settings = sorted({(r["stride"], r["threshold"]) for r in records})
    series = {f"S={s} tau={t}": list(enumerate(r["density"] for r in records
                                               if (r["stride"], r["threshold"]) == (s, t)))
              for s, t in settings}
    line_plot(path, series, xlabel="layer", ylabel="density (selected / causal blocks)",
              log2_x=False)

if __name__ == "__main__":
    main()
