"""Does the order of the FA3 executor's mini-requests matter? Same selection, same page lists,
several orders, same run (H100):

- ``head-major`` (what XATTN ran until commit 5a41c7c): all query blocks of head 0, then head 1, ... Heads of one
  KV group run far apart in time, so a KV block that several of them selected is read from
  HBM once per head unless L2 still holds it.
- ``group-interleaved``: (KV head, query block, head in group): the G heads of a group on the
  same query block run side by side and can share the KV blocks they both selected in L2.
  Its query is copied into that order here (a layout change the backend would need).
- ``group-interleaved-seqused-q``: the same execution order with the head-major query left in
  place: FA3 takes each mini-request's start from ``cu_seqlens_q`` and its length from
  ``seqused_q``, so the starts need not be sorted. vLLM's Python wrapper does not pass
  ``seqused_q``; ``executors.fa3_varlen_paged`` calls its FA3 op directly.
- ``head-major-blocks-descending`` and ``longest-first`` (the same seqused_q trick): FA3's
  varlen scheduler hands out tiles in batch order, so head-major runs each head's longest
  mini-requests (last query blocks) last and the final wave can leave SMs idle; these two
  put long mini-requests first (per head, or globally by key count). The first is what XATTN
  runs now (``plan.mini_requests_longest_first``; for one request without context it is
  exactly the per-head reversal timed here).
- ``group-interleaved-blocks-descending``: group-interleaved with the query blocks descending
  (both effects at once), KV head outermost; ``blocks-descending-group-interleaved``: the
  same with the query block outermost (all heads of the last query block first).

    python scripts/bench_executor_order.py --out benchmarks/results/executor_order_h100.json

One request with no context and whole blocks (every mini-request 128 query rows), per-query-head
ratio selection; outputs of all orders must be identical (checked), then all orders and dense
FA3 are timed with triton.testing.do_bench in --rounds interleaved rounds; a share is taken
within each round and the record keeps the median (and every round's times). --topks K...
adds top-k selections, which give every mini-request min(K, causal) key blocks: the share as a
function of the list length each FA3 tile walks. Random inputs make heads' selections nearly
independent, which understates what real attention (shared sink / local / stripe blocks)
would share; --threshold adds threshold cases on the same random inputs. --capture DIR runs
the same comparison on Q/K/V captured from a real model (scripts/capture_qkv.py; every
--layer-step-th layer, threshold selection at --thresholds or the default), where the heads of
a group do share blocks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import executor_flops  # noqa: E402
from bench_common import (  # noqa: E402
    SHAPES, captured_layers, causal_flops, dense_fa3, line_plot, paged_inputs, time_interleaved,
    write_records,
)

from vllm_xattn.backends.executors import fa3_varlen_paged  # noqa: E402
from vllm_xattn.config import XAttnConfig  # noqa: E402
from vllm_xattn.kernels import (  # noqa: E402
    antidiagonal_scores_paged, build_page_lists, folded_kv_views, plan_prefill,
    select_blocks_packed,
)


def in_order(q_hm, k_pages, v_pages, lists, order, B, d):
    """(output, launch) running the head-major mini-requests in ``order`` (FA3 takes each start
    from ``cu_seqlens_q`` and its length from ``seqused_q``, so starts need not be sorted); the
    output is in head-major rows whatever the order."""
    M = order.numel()
    total = torch.full((1,), M * B, dtype=torch.int32, device="cuda")  # batch + 1 entries
    cu = torch.cat([lists.cu_seqlens_q[:-1][order], total])
    used_q = torch.full((M,), B, dtype=torch.int32, device="cuda")
    pt, used_k = lists.page_table[order].contiguous(), lists.seqused_k[order].contiguous()
    out = torch.empty_like(q_hm)

    def run():
        return fa3_varlen_paged(q_hm, k_pages, v_pages, out, cu_seqlens_q=cu, seqused_q=used_q,
                                max_seqlen_q=B, seqused_k=used_k, max_seqlen_k=lists.max_seqlen_k,
                                block_table=pt, softmax_scale=d ** -0.5)

    return out, run


def compare_orders(q, kv, bt, cu_q, sl, sels, base_rec, *, rounds):
    """Records for one set of inputs (one request, whole blocks): each selection in ``sels``
    run in every order above, outputs checked identical, then all orders and dense FA3 timed
    in ``rounds`` interleaved rounds (``bench_common.time_interleaved``)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    n, hq, d = q.shape
    hkv = kv.shape[1]
    G, B = hq // hkv, 128
    S = XAttnConfig().stride
    assert n % B == 0
    dense = dense_fa3(q, kv, bt, cu_q, sl)
    dense_fl = causal_flops([n], [n], hq, d)
    plan = plan_prefill(cu_q, sl, block_size=B, stride=S).to("cuda")
    a = antidiagonal_scores_paged(q, kv, bt, plan)
    R = plan.total_q_blocks
    M = hq * R
    # head-major query: mini-request m = h * R + r owns rows [m * B, (m + 1) * B)
    q_hm = q.transpose(0, 1).contiguous().view(M * B, 1, d)
    # group-interleaved position m' = (hk * R + r) * G + g holds mini-request (hk * G + g) * R + r
    hk_, r_, g_ = torch.meshgrid(torch.arange(hkv), torch.arange(R), torch.arange(G), indexing="ij")
    perm = ((hk_ * G + g_) * R + r_).reshape(-1).cuda()
    q_gi = q_hm.view(M, B, 1, d)[perm].reshape(M * B, 1, d)
    k_pages, v_pages, _ = folded_kv_views(kv)
    # Orders over the head-major query left in place (outputs compared in head-major order).
    qb_desc = (torch.arange(M, device="cuda").view(hq, R).flip(1)).reshape(-1)
    perm_desc = ((hk_ * G + g_) * R + (R - 1 - r_)).reshape(-1).cuda()  # groups, blocks descending
    # blocks descending outermost, then KV head, then head in group
    desc_gi = ((hk_ * G + g_) * R + (R - 1 - r_)).permute(1, 0, 2).reshape(-1).cuda()
    records = []
    for sel in sels:
        cfg = XAttnConfig(**sel)
        counts, ids = select_blocks_packed(a, plan, mode=cfg.selection, threshold=cfg.threshold,
                                           ratio=cfg.ratio, topk=cfg.topk)
        lists = build_page_lists(counts, ids, bt, kv, plan)
        fl = executor_flops(lists, 1, d)
        longest = torch.sort(lists.seqused_k.long(), descending=True, stable=True).indices
        outs, fns = {}, {"dense": dense}
        for name, order in (("group-interleaved-seqused-q", perm),
                            ("head-major-blocks-descending", qb_desc),
                            ("longest-first", longest),
                            ("group-interleaved-blocks-descending", perm_desc),
                            ("blocks-descending-group-interleaved", desc_gi)):
            try:
                o_hm, fns[name] = in_order(q_hm, k_pages, v_pages, lists, order, B, d)
                fns[name]()
                outs[name] = o_hm.view(M, B, 1, d)
            except Exception as e:  # the op's signature or seqused_q support differs
                fns.pop(name, None)
                print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
        for name, (qq, pt, used, cu) in {
            "head-major": (q_hm, lists.page_table, lists.seqused_k, lists.cu_seqlens_q),
            "group-interleaved": (q_gi, lists.page_table[perm].contiguous(), lists.seqused_k[perm].contiguous(),
                                  torch.arange(M + 1, device="cuda", dtype=torch.int32) * B),
        }.items():
            o = torch.empty_like(qq)

            def run(qq=qq, pt=pt, used=used, cu=cu, o=o):
                return flash_attn_varlen_func(
                    q=qq, k=k_pages, v=v_pages, cu_seqlens_q=cu, max_seqlen_q=B,
                    seqused_k=used, max_seqlen_k=lists.max_seqlen_k, softmax_scale=d ** -0.5,
                    causal=True, block_table=pt, fa_version=3, out=o, num_splits=1)

            run()
            outs[name], fns[name] = o.view(M, B, 1, d), run
        same = bool(torch.equal(outs["group-interleaved"], outs["head-major"][perm]))
        same = same and all(torch.equal(o, outs["head-major"]) for k, o in outs.items()
                            if k not in ("head-major", "group-interleaved"))
        times = time_interleaved(fns, rounds=rounds)
        # share of dense throughput within each round, then the median over rounds
        shares = {k: [(fl / t) / (dense_fl / td) for t, td in zip(ts, times["dense"])]
                  for k, ts in times.items() if k != "dense"}
        density = int(counts.sum()) / (plan.causal_blocks() * hq)
        minis = lists.seqused_k.double() / B
        rec = dict(**base_rec, seq_len=n, stride=S, **sel, density=density,
                   mean_blocks_per_mini_request=float(minis.mean()), rounds=rounds,
                   identical_outputs=same, dense_fa3_ms=median(times["dense"]),
                   dense_tflops=dense_fl / median(times["dense"]) / 1e9,
                   **{f"{k}_ms": median(v) for k, v in times.items() if k != "dense"},
                   **{f"{k}_share_of_dense_throughput": median(v) for k, v in shares.items()},
                   round_ms=times)
        records.append(rec)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items() if k != "round_ms"},
              flush=True)
    return records


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/executor_order_h100.json")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.35])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[])
    ap.add_argument("--topks", type=int, nargs="*", default=[],
                    help="also top-k selections: every mini-request min(k, causal) blocks long, "
                         "the executor's share as a function of the per-mini-request key count")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per case")
    ap.add_argument("--capture", help="a scripts/capture_qkv.py folder: real Q/K/V instead of random")
    ap.add_argument("--layer-step", type=int, default=4, help="with --capture: every n-th layer")
    args = ap.parse_args()
    records = []
    if args.capture:
        sels = [dict(threshold=t) for t in args.thresholds] or [{}]  # default: the config's threshold
        for name, q, kv, bt, cu, sl in captured_layers(args.capture, args.layer_step):
            records += compare_orders(q, kv, bt, cu, sl, sels,
                                      dict(inputs=f"captured {name}", num_q_heads=q.shape[1],
                                           num_kv_heads=kv.shape[1], head_dim=q.shape[2]),
                                      rounds=args.rounds)
            torch.cuda.empty_cache()
    else:
        dims = SHAPES["llama-3.1-8b"]
        sels = [dict(selection="ratio", ratio=x) for x in args.ratios] + [dict(threshold=t) for t in args.thresholds]
        sels += [dict(selection="topk", topk=k) for k in args.topks]
        for n in args.seq_lens:
            q, kv, bt, cu_q, sl = paged_inputs([n], [n], **dims)
            records += compare_orders(q, kv, bt, cu_q, sl, sels, dict(shape="llama-3.1-8b", inputs="random"),
                                      rounds=args.rounds)
            del q, kv
            torch.cuda.empty_cache()
    write_records(Path(args.out), records, "python scripts/bench_executor_order.py " + " ".join(sys.argv[1:]))
    plot(records, Path(args.out).with_suffix(".png"))


# The order XATTN runs (plan.mini_requests_longest_first; this one for a request without context).
DEFAULT_ORDER = "head-major-blocks-descending"


def plot(records, path):
    """Share of dense FA3 throughput against the mean key blocks per mini-request, XATTN's order."""
    key = f"{DEFAULT_ORDER}_share_of_dense_throughput"
    series = {}
    for r in records:
        if key in r:
            kind = "top-k" if r.get("selection") == "topk" else r.get("selection", "threshold")
            series.setdefault(f"{r['seq_len'] // 1024}K, {kind}", []).append(
                (r["mean_blocks_per_mini_request"], r[key]))
    line_plot(path, series, xlabel="mean key blocks per mini-request (FA3 tile)",
              ylabel="share of dense FA3 throughput", hlines=(0.9,))


if __name__ == "__main__":
    main()
