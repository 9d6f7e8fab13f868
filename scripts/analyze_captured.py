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
    plan_prefill, select_blocks_packed, serving_key_copy, unpack_scores,
)

CHECK_ROWS = 2048  # queries (16 blocks) whose output is compared with the reference


def load_layer(path):
    """A captured layer on the GPU: (name, q, k, v, paged cache, block table, cu_seqlens)."""
    cap = torch.load(path)
    q, k, v = (cap[x].cuda() for x in ("q", "k", "v"))
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    kv, bt = make_paged_cache(k, v, cu, 16, generator=torch.Generator().manual_seed(0))
    return cap["layer"], q, k, v, kv, bt, cu


def check_layer(q, k, v, kv, bt, cu, stride: int, tau: float, output: bool = True) -> dict:
    """One layer's kernels against the reference at (stride, tau): the scores' largest relative
    error, the query-block rows whose selection differs from the reference's selection on the
    reference's scores (near-ties), the density, and (``output``) the relative error of the
    sparse path's output, run as serving runs it (``SparsePrefill``, the FA3 executor, the
    layer's own keys), against the float32 reference block-sparse attention on the kernel's
    own selection, over the last ``CHECK_ROWS`` queries (the sparsest). Also a GPU test
    (``tests/test_gpu_real_model.py``)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    plan = plan_prefill(cu, [n], block_size=128, stride=stride).to("cuda")
    a = antidiagonal_scores_paged(q, kv, bt, plan)
    want = ref.antidiagonal_block_scores(q, k, cu.cuda(), cu.cuda(), stride=stride, block_size=128)[0]
    got = unpack_scores(a, plan)[0]
    counts, ids = select_blocks_packed(a, plan, threshold=tau)
    mask = masks_from_selection(counts, ids, plan)[0]
    mask_ref = ref.select_blocks([want], threshold=tau)[0].cpu()
    rec = dict(stride=stride, threshold=tau, seq_len=n,
               density=int(counts.sum()) / (plan.causal_blocks() * hq),
               max_rel_score_err=((got - want).abs() / (want.abs() + 1e-3)).max().item(),
               selection_rows=mask.shape[0] * mask.shape[1],
               rows_differing_from_reference=int((mask != mask_ref).any(-1).sum()))
    if output:
        cfg = XAttnConfig(stride=stride, threshold=tau)
        step = SparseStep.from_host_plan(
            plan_prefill(cu, [n], block_size=cfg.block_size, stride=stride, **serving_key_copy(stride, hq, hkv, n)),
            block_table=bt, tok_start=0, tok_end=n, selection_heads=hq, device=q.device)
        pool = ScratchPool(max_tokens=n, max_reqs=1, max_seq_len=n, num_q_heads=hq, head_dim=d,
                           dtype=q.dtype, cfg=cfg, page_size=16, device=q.device, num_kv_heads=hkv)
        out = torch.zeros_like(q)
        run_counts = SparsePrefill(cfg, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5,
                                   thresholds=None).run(q, kv, step, out, pool, keys=k)
        # rows whose selected count differs from the kernels' launched alone (the run's scoring
        # reads the keys through TMA: a different summation order can only flip a near-tie)
        rec["run_rows_differing"] = int((run_counts != counts).sum())
        rows = CHECK_ROWS // 128
        want_out = ref.block_sparse_attention(
            q[-CHECK_ROWS:].float(), k.float(), v.float(),
            torch.tensor([0, CHECK_ROWS], device="cuda"), torch.tensor([0, n], device="cuda"),
            [mask[:, -rows:].cuda()], block_size=128)
        rec["output_rel_err_last_blocks"] = (
            (out[-CHECK_ROWS:].float() - want_out).norm() / want_out.norm()).item()
    return rec


def analyze_layer(path, settings, dense_ms_cache, timing: bool):
    name, q, k, v, kv, bt, cu = load_layer(path)
    n = q.shape[0]
    if "dense" not in dense_ms_cache and timing:
        dense_ms_cache["dense"] = do_bench(dense_fa3(q, kv, bt, cu, torch.tensor([n], dtype=torch.int32)), rep=50)
    recs = []
    for stride, tau in settings:
        rec = dict(layer=name, **check_layer(q, k, v, kv, bt, cu, stride, tau, output=(stride, tau) == (8, 0.9)))
        if timing:
            plan = plan_prefill(cu, [n], block_size=128, stride=stride).to("cuda")

            def run():
                aa = antidiagonal_scores_paged(q, kv, bt, plan)
                c, i = select_blocks_packed(aa, plan, threshold=tau)
                return build_page_lists(c, i, bt, kv, plan)
            rec["ms"] = do_bench(run, rep=50)
            rec["dense_fa3_ms"] = dense_ms_cache["dense"]
            rec["ratio"] = rec["ms"] / rec["dense_fa3_ms"]
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
