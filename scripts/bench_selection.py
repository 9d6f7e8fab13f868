"""Selection kernel and head-major copy, timed and checked at 32K / 128K (Llama layer).

    python scripts/bench_selection.py --out benchmarks/results/selection_h100.json \
        [--old-selection FILE]   # e.g. `git show 5f04a78^:kernels/selection.py > FILE`

Per (tokens, stride, mode): selection time (triton.testing.do_bench, median) on the same
kernel scores, optionally against an older selection module in the same run, and the rows
whose selection differs from the reference (float32) and from the same rule evaluated in
float64 (rows where float32 rounding decides a threshold crossing). For the threshold
selection also the FA3 page lists built from it (``build_page_lists``) by warps per
mini-request, checked equal. Then the token-major -> head-major query copy:
copy_tokens_heads vs torch copy_.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, paged_inputs, write_records  # noqa: E402

from vllm_xattn import reference as ref  # noqa: E402
from vllm_xattn.kernels import (  # noqa: E402
    antidiagonal_scores_paged, build_page_lists, copy_tokens_heads, masks_from_selection, plan_prefill,
    select_blocks_packed, unpack_scores,
)


def load_old(path: str):
    """An older kernels/selection.py, imported as a module of vllm_xattn.kernels (relative imports)."""
    spec = importlib.util.spec_from_file_location("vllm_xattn.kernels._old_selection", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.select_blocks_packed


def threshold_masks_f64(scores, tau: float):
    """The threshold rule of reference.select_blocks, in float64 (rows [n_qb] of [H, n_qb, n_kb])."""
    out = []
    for A in scores:
        A = A.double().clamp_min(0)
        h, n_qb, n_kb = A.shape
        i = torch.arange(n_kb - n_qb, n_kb, device=A.device)[None, :, None]
        j = torch.arange(n_kb, device=A.device)[None, None, :]
        forced = ((j == 0) | (j == i)).expand(h, -1, -1)
        other = (j <= i) & ~forced
        w = torch.where(other, A, 0.0)
        # descending mass, ties to the lower j: sort by mass then stable on j
        order = torch.sort(w, dim=-1, descending=True, stable=True).indices
        ws = torch.gather(w, -1, order)
        before = torch.where(forced, A, 0.0).sum(-1, keepdim=True) + ws.cumsum(-1) - ws
        lim = tau * torch.where(j <= i, A, 0.0).sum(-1, keepdim=True)
        keep_sorted = ((before < lim) | (tau >= 1.0)) & torch.gather(other, -1, order)
        keep = torch.zeros_like(other).scatter(-1, order, keep_sorted)
        out.append(keep | forced)
    return out


def rows_differing(a, b) -> int:
    return sum(int((x.cpu() != y.cpu()).any(-1).sum()) for x, y in zip(a, b))


def page_list_times(counts, ids, bt, kv, plan, warps) -> dict:
    """FA3 page lists of one selection, timed per warps per mini-request; every variant must
    write the same table (a zeroed buffer each, so entries past seqused_k compare too)."""
    hq = ids.shape[0]
    cu = plan.mini_cu_seqlens_q(hq).to(ids.device)
    shape = (hq * plan.total_q_blocks, plan.max_kb * (plan.block_size // kv.shape[2]))
    out, tables = {}, []
    for w in warps:
        pt = torch.zeros(shape, dtype=torch.int32, device=ids.device)
        pl = build_page_lists(counts, ids, bt, kv, plan, page_table=pt, cu_seqlens_q=cu, num_warps=w)
        tables.append((pt, pl.seqused_k))
        out[w] = do_bench(lambda: build_page_lists(counts, ids, bt, kv, plan, page_table=pt, cu_seqlens_q=cu,
                                                   num_warps=w), warmup=5, rep=50)
    same = all(torch.equal(t[0], tables[0][0]) and torch.equal(t[1], tables[0][1]) for t in tables)
    return {"page_lists_ms_by_num_warps": out, "page_lists_equal_across_warps": same,
            "pages_selected": int(tables[0][1].sum()) // kv.shape[2] if tables else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/selection_h100.json")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--old-selection", help="an older kernels/selection.py to time in the same run")
    ap.add_argument("--num-warps", type=int, nargs="*", default=[],
                    help="also time the selection kernel with these warps per row")
    ap.add_argument("--page-list-warps", type=int, nargs="*", default=[1, 2, 4],
                    help="time the FA3 page lists with these warps per mini-request")
    args = ap.parse_args()
    old = load_old(args.old_selection) if args.old_selection else None
    dims = SHAPES["llama-3.1-8b"]
    records = []
    for n in args.seq_lens:
        q, kv, bt, cu_q, sl = paged_inputs([n], [n], **dims)
        for S in args.strides:
            plan = plan_prefill(cu_q, sl, block_size=128, stride=S).to("cuda")
            a = antidiagonal_scores_paged(q, kv, bt, plan)
            scores = unpack_scores(a, plan)
            for mode, kw in (("threshold", dict(threshold=args.threshold)), ("ratio", dict(ratio=0.1))):
                counts, ids = select_blocks_packed(a, plan, mode=mode, **kw)
                got = masks_from_selection(counts, ids, plan)
                rec = dict(shape="llama-3.1-8b", seq_len=n, stride=S, mode=mode, **kw,
                           rows=sum(m.shape[0] * m.shape[1] for m in got),
                           ms=do_bench(lambda: select_blocks_packed(a, plan, mode=mode, **kw), warmup=5, rep=50),
                           rows_differing_from_reference=rows_differing(got, ref.select_blocks(scores, mode=mode, **kw)))
                rec["ms_by_num_warps"] = {w: do_bench(lambda: select_blocks_packed(a, plan, mode=mode, num_warps=w, **kw),
                                                      warmup=5, rep=50) for w in args.num_warps}
                if mode == "threshold":
                    rec["rows_differing_from_float64_rule"] = rows_differing(got, threshold_masks_f64(scores, args.threshold))
                    rec.update(page_list_times(counts, ids, bt, kv, plan, args.page_list_warps))
                if old is not None:
                    oc, oi = old(a, plan, mode=mode, **kw)[:2]  # older versions also returned the total
                    rec["old_ms"] = do_bench(lambda: old(a, plan, mode=mode, **kw), warmup=5, rep=50)
                    rec["rows_differing_from_old"] = rows_differing(got, masks_from_selection(oc, oi, plan))
                    if mode == "threshold":
                        rec["old_rows_differing_from_float64_rule"] = rows_differing(
                            masks_from_selection(oc, oi, plan), threshold_masks_f64(scores, args.threshold))
                records.append(rec)
                print(rec, flush=True)
        T, H, D = n, dims["num_q_heads"], dims["head_dim"]
        src = q.reshape(T, H, 1, D)
        dst = torch.empty(H, T, 1, D, dtype=q.dtype, device="cuda").transpose(0, 1)
        copy_tokens_heads(dst, src)
        rec = dict(shape="llama-3.1-8b", seq_len=n, copy="query to head-major", exact=bool(torch.equal(dst, src)),
                   ms=do_bench(lambda: copy_tokens_heads(dst, src), warmup=5, rep=50),
                   torch_copy_ms=do_bench(lambda: dst.copy_(src), warmup=5, rep=50))
        rec["TB_per_s"] = 2 * q.numel() * q.element_size() / rec["ms"] / 1e9
        records.append(rec)
        print(rec, flush=True)
        del q, kv
        torch.cuda.empty_cache()
    write_records(Path(args.out), records, "python scripts/bench_selection.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
