"""Where does the scoring kernel lose to a plain Triton GEMM of its tile? (diagnosis, H100)

``bench_gemm_ceiling.py`` ran the 128 x 256 x 64 tile at 629 TF/s with pointer loads, while the
scoring kernel runs its GEMM at about 400. This times the real kernel next to copies of it with
one part taken out, each written from ``kernels/scoring.py`` by a text substitution into a
temporary module (so the product kernel carries no diagnostic switches):

- ``no-epilogue``: the per-key-tile softmax and scratch stores replaced by a row sum of the
  accumulator (keeps the GEMM live; the scores are wrong, only the time counts);
- ``no-load-masks``: the Q / K loads without their masks (inputs of whole tiles only);
- ``q-evict-last`` / ``k-evict-first`` / ``q-last-k-first``: L2 eviction hints on the query
  load (re-read at every key tile) and the key load (streamed);
- ``contiguous-pages``: the real kernel over a cache whose pages are physically in order;
- ``stages-3``: the real kernel with a 3-deep load pipeline instead of 4;
- ``shared-q`` / ``shared-k``: every query head reads head 0's query (or every KV head KV head
  0's keys), through a zero head stride: if keeping 132 distinct query tiles (key streams)
  in L2 is the limit, these run faster (their scores are wrong; timing only);
- ``programs-N`` (``--programs``): the real kernel on N persistent programs (one per SM runs
  at a time): if time falls less than in proportion to N, the SMs share a limit (L2 or HBM);
- ``baseline`` (``--baseline-src``): an earlier copy of the kernel file, e.g. before a change.
  (``mask-diagonal-only``, the causal ``where`` only on key tiles that cross the diagonal, was
  a variant here until the kernel adopted it: ``scoring_probe2_h100.json``. ``flatten`` (one
  software pipeline over all key tiles) and ``n128, 2/SM`` (128-column tiles, two programs per
  SM) were variants at af47b74, both slower: ``scoring_probe7_h100.json``.)
- ``masked loads only``: the real kernel with its whole-tile TMA path off (``tma=False``): every
  tile through the masked pointer loads, as before the TMA path; ``key copy alone``: the
  contiguous key copy that the TMA path makes first (``kernels/key_copy.py``). The variants
  that led to the TMA path (``edge-masks``: an unmasked copy of the chunk loop for whole tiles;
  ``, TMA query``, ``, TMA query and keys``; ``aligned, ...``: one unmasked loop) were here
  until e3cb89a (``scoring_probe14_h100.json``).
- ``heads-outer``: work items head by head instead of heads innermost.
- ``half-last-tile``: a whole tile whose right half is wholly past the diagonal (every other work
  item's last tile) runs its GEMM at half width through its own TMA descriptor, the other half
  -inf into the kernel's epilogue (2.9 % less GEMM work at 32K / S=8); scores checked against the
  kernel's. ``half-last-tile-own-epilogue``: with a half-width epilogue of its own (spills: see
  ``sass_loop.py --variants``).
- ``flat-tma``: the TMA path as one pipelined loop over (key tile, chunk) with the epilogue
  inside, so loads run ahead across key tiles (timed inputs only: every tile whole).
- ``paired-q`` / ``quarter-q``: query heads h and h + Hq/2 (heads Hq/4 apart) read the same
  query memory, so the resident programs hold 1/2 (1/4) as many distinct query tiles; between
  the kernel and ``shared-q`` (Nsight Compute: the query re-reads miss L2, ``ncu_scoring.py``).
- ``ws-prototype``: the warp-specialised Gluon kernel of ``scoring_ws_prototype.py`` (a loader
  warpgroup keeps a cp.async ring full across key tiles; two compute warpgroups run wgmma and
  the softmax; ``, no epilogue``: timing only), scores checked against the kernel first.
  ``ws-pingpong lag L``: the same with each compute warpgroup on its own 64 rows, the second
  L chunks behind the first, so one's softmax can run under the other's MMAs (FA3's ping-pong).
  ``ws-prototype tma`` / ``ws-pingpong tma``: whole tiles loaded through TMA as the Triton
  kernel's (with ``--serving``, from the layer's own keys); ``ws-pingpong tma dC lag L``: with
  C-column load stages (4 of 64, 8 of 32) and the second warpgroup L stages behind.
- (``exp2-poly-Kof8``: K of each 8 of a thread's softmax exp2 on the FMA pipe by a degree-5
  polynomial, FlashAttention-4's trick, was here at 5afb230 with the kernel's ``exp2_poly``: no
  faster for K = 1-3, ``scoring_probe18_h100.json``.)
- ``head-major-q``: the real kernel reading the query from a head-major copy (what the
  executors copy it to anyway), where a super-row is S*D contiguous elements instead of S rows
  of the token-major query.

With ``--serving`` the plan and keys are serving's (a fresh prompt's whole tiles read the
layer's own keys, no copy), and ``--with-selection`` also times selection + page lists on the
kernel's scores in the same rounds: each record's ``ratio_with_selection`` adds them to the
variant's time per round. It reads high: timed alone, the two short kernels are host-bound at
32K (0.065 ms at S=8, against 0.03 ms they add inside ``bench_scoring.py``'s pipeline), so
quote the pipeline's own figure and use this column to compare variants.

    python scripts/probe_scoring_variants.py --out benchmarks/results/scoring_probe_h100.json
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SHAPES, causal_flops, dense_fa3, paged_inputs, step_keys, time_interleaved, write_records,
)
from bench_scoring import pipeline, serving_plan  # noqa: E402

from scoring_ws_prototype import antidiagonal_scores_paged_ws  # noqa: E402

from vllm_xattn.kernels import copy_keys, plan_prefill  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "kernels" / "scoring.py"
DENSE = "dense FA3"
SELECTION = "selection + page lists"  # timed on the kernel's scores (--with-selection)


def _lines_between(src: str, first: str, last: str) -> str:
    """The whole lines of ``src`` from the one starting with ``first`` to the one containing ``last``."""
    a = src.index(first)
    a = src.rindex("\n", 0, a) + 1
    b = src.index("\n", src.index(last, a)) + 1
    return src[a:b]


def _indented(text: str, delta: int) -> str:
    """``text`` with every non-blank line moved ``delta`` spaces right (left if negative)."""
    return "".join((" " * delta + line if delta >= 0 else line[-delta:]) + "\n" if line.strip() else "\n"
                   for line in text.splitlines())


# The per-key-tile softmax and scratch stores, as they stand in the kernel.
EPILOGUE = _lines_between(SRC.read_text(), "if kt * BLOCK_N + BLOCK_N - 1 > a0:", "tl.store(scr_m + kt * BLOCK_M + offs_m, m_new)")
NO_EPILOGUE = "            l_i = l_i + tl.sum(acc, 1)\n            m_i = tl.zeros([BLOCK_M], tl.float32)\n"
# L2 hints on the two operand loads: keep the query tile (re-read at every key tile) resident,
# let the key stream go first.
Q_MASK, K_MASK = "mask=qmask[:, None], other=0.0)", "mask=kmask[None, :], other=0.0)"
Q_BASE = "q_base = q_ptr + h.to(tl.int64) * s_qh"
Q_LAST = (Q_MASK, Q_MASK[:-1] + ', eviction_policy="evict_last")')
K_FIRST = (K_MASK, K_MASK[:-1] + ', eviction_policy="evict_first")')
# ``flat-tma``: the TMA path as one software pipeline over (key tile, chunk), the epilogue under
# an ``if`` at each tile's last chunk, so the next tile's first loads are in flight while it runs
# (the nested loops drain and refill the pipeline at every key tile). Whole tiles only: the
# single requests timed here, whose lengths are multiples of BLOCK_N * S.
_TILE_LOOP = "        for kt in range(0, n_kt):\n            cols = kt * BLOCK_N + offs_n\n"
FLAT_TMA = """        n_kt_loop = n_kt
        if TMA:
            n_kt_loop = 0
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for i in range(0, n_kt * (S * ND)):
                kt = i // (S * ND)
                it = i % (S * ND)
                t = it // ND
                dc = (it % ND) * BLOCK_D
                tok = q_tok - t
                q = q_desc.load([tok // S, (tok % S) * s_qt + h * s_qh + dc])
                ktok = k0 + kt * BLOCK_N * S + t
                k = k_desc.load([ktok // S, (ktok % S) * s_ct + hk * s_ch + dc]).T
                acc = tl.dot(q, k.to(q.dtype), acc, input_precision=PREC)
                if it == S * ND - 1:
                    cols = kt * BLOCK_N + offs_n
""" + _indented(EPILOGUE, 8) + """\
                    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
"""
# ``half-last-tile``: a whole tile whose right half lies wholly past the diagonal (the last tile
# of every work item starting at an even multiple of BLOCK_M) runs its GEMM at half width through
# a second TMA descriptor; the other half of the accumulator is -inf, so the softmax epilogue is
# the kernel's own: 2.9 % less GEMM work at 32K / S=8. (Probe 8, 04d199a, tried a half tile with
# its own epilogue in the masked-load kernel and lost 3-5 %; with its own epilogue here the
# kernel spills (``half-last-tile-own-epilogue``, ``scoring_sass_half_tile_sm90a.json``).)
_K_DESC = "                                           block_shape=[BLOCK_N, BLOCK_D])\n"
_TMA_GEMM = _lines_between(SRC.read_text(), "k_tok = k0 + kt * BLOCK_N * S",
                           "acc = tl.dot(q, k.to(q.dtype), acc, input_precision=PREC)")
# The kernel's whole-tile loop at half width: its own descriptor, accumulator and key tile.
_HALF_LOOP = (_TMA_GEMM.replace("k = k_desc.load", "k_h = kh_desc.load").replace("k = k.to(", "k_h = k_h.to(")
              .replace("acc = tl.dot(q, k.to(q.dtype), acc,", "acc_h = tl.dot(q, k_h.to(q.dtype), acc_h,"))
HALF_GEMM = """                    if kt * BLOCK_N + BLOCK_N // 2 > a0 + BLOCK_M - 1:
                        acc_h = tl.zeros([BLOCK_M, BLOCK_N // 2], tl.float32)
""" + _indented(_HALF_LOOP, 4) + """\
                        empty = tl.full([BLOCK_M, BLOCK_N // 2], float("-inf"), tl.float32)
                        acc = tl.reshape(tl.permute(tl.join(acc_h, empty), (0, 2, 1)), (BLOCK_M, BLOCK_N))
                    else:
""" + _indented(_TMA_GEMM, 4)
# ``half-last-tile-own-epilogue``: the same half tile with its own half-width softmax epilogue and
# zeros stored for the empty half, as probe 8 did in the masked-load kernel.
_TILE_BODY = _lines_between(SRC.read_text(), "acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)",
                            "tl.store(scr_m + kt * BLOCK_M + offs_m, m_new)")
HALF_TILE_OWN_EPILOGUE = """            half = False
            if TMA:
                half = (q_whole & ((kt * BLOCK_N + BLOCK_N) * S <= n)
                        & (kt * BLOCK_N + BLOCK_N // 2 > a0 + BLOCK_M - 1))
            if half:
                acc_h = tl.zeros([BLOCK_M, BLOCK_N // 2], tl.float32)
""" + _indented(_HALF_LOOP, -4) + """\
                cols_h = kt * BLOCK_N + tl.arange(0, BLOCK_N // 2)
                acc_h = tl.where(cols_h[None, :] <= rows[:, None], acc_h, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(acc_h, 1) * qk_scale)
                p_h = tl.exp2(acc_h * qk_scale - m_new[:, None])
                psum_h = tl.sum(tl.reshape(p_h, (BLOCK_M, NB_T // 2, BPS)), 2)
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(psum_h, 1)
                m_i = m_new
                h_offs = offs_m[:, None] * NB_T + tl.arange(0, NB_T // 2)[None, :]
                tl.store(scr_p + kt * (BLOCK_M * NB_T) + h_offs, psum_h)
                tl.store(scr_p + kt * (BLOCK_M * NB_T) + h_offs + NB_T // 2, tl.zeros_like(psum_h))
                tl.store(scr_m + kt * BLOCK_M + offs_m, m_new)
            else:
""" + _indented(_TILE_BODY, 4)
_KH_DESC = (_K_DESC, _K_DESC + "        kh_desc = tl.make_tensor_descriptor(kc_ptr, shape=[k_rows_s, S * s_ct], "
                               "strides=[S * s_ct, 1], block_shape=[BLOCK_N // 2, BLOCK_D])\n")
VARIANTS = {
    "half-last-tile": [_KH_DESC, (_TMA_GEMM, HALF_GEMM)],
    "half-last-tile-own-epilogue": [_KH_DESC, (_TILE_BODY, HALF_TILE_OWN_EPILOGUE)],
    "flat-tma": [(_TILE_LOOP, FLAT_TMA + _TILE_LOOP.replace("n_kt)", "n_kt_loop)"))],
    "no-epilogue": [(EPILOGUE, NO_EPILOGUE)],
    "no-load-masks": [(Q_MASK, ")"), (K_MASK, ")")],
    "q-evict-last": [Q_LAST],
    "k-evict-first": [K_FIRST],
    "q-last-k-first": [Q_LAST, K_FIRST],
    # work items head by head (each head's tiles longest first) instead of heads innermost: the
    # programs resident together read one KV head's keys (the all-heads GEMM ran 9 % faster one
    # head at a time than heads innermost: gemm_ceiling_heads_*_h100.json)
    "heads-outer": [("        tile = w // num_q_heads  # heads innermost: neighbours share K in L2\n"
                     "        h = w % num_q_heads\n",
                     "        tile = w % (n_work // num_q_heads)\n"
                     "        h = w // (n_work // num_q_heads)\n")],
    # Heads h and h + Hq/2 (or every Hq/4-th head) read the same query memory: the programs
    # resident together hold half (a quarter) as many distinct query tiles, what splitting each
    # work item's key sweep over two programs would give L2 (scores wrong; timing only).
    "paired-q": [(Q_BASE, Q_BASE.replace("h.to(tl.int64)", "(h % (num_q_heads // 2)).to(tl.int64)"))],
    "quarter-q": [(Q_BASE, Q_BASE.replace("h.to(tl.int64)", "(h % (num_q_heads // 4)).to(tl.int64)"))],
}


def load_variant(name: str, source: Path = SRC):
    src = source.read_text().replace("from .", "from vllm_xattn.kernels.")
    for old, new in VARIANTS[name] if source == SRC else []:  # a name typo fails here
        assert old in src, (name, old[:60])
        src = src.replace(old, new, 1)
    path = Path(tempfile.mkdtemp()) / f"scoring_{re.sub(r'[^0-9A-Za-z]+', '_', name)}.py"
    path.write_text(src)  # Triton reads the kernel's source from its file
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/scoring_probe_h100.json")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--baseline-src", type=Path,
                    help="also time this earlier copy of kernels/scoring.py as variant 'baseline'")
    ap.add_argument("--only", nargs="+", help="time only these variants")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per case")
    ap.add_argument("--serving", action="store_true",
                    help="plan and keys as serving makes them (the layer's own keys, no key copy)")
    ap.add_argument("--with-selection", action="store_true",
                    help="also time selection + page lists; records get ratio_with_selection")
    ap.add_argument("--programs", type=int, nargs="*", default=[],
                    help="also time the real kernel on this many persistent programs (default: one per SM; 2 x SMs until d9d840b)")
    args = ap.parse_args()
    from vllm_xattn.kernels import scoring

    dims = SHAPES["llama-3.1-8b"]
    hq, d = dims["num_q_heads"], dims["head_dim"]
    mods = {"real": scoring, **{v: load_variant(v) for v in VARIANTS}}
    if args.baseline_src:
        mods["baseline"] = load_variant("baseline", args.baseline_src)
    records = []
    for n in args.seq_lens:
        q, kv, bt, cu_q, sl = paged_inputs([n], [n], **dims)
        ordered = torch.arange(bt.numel(), dtype=torch.int32, device="cuda").view_as(bt)  # pages in order
        q_hm = q.transpose(0, 1).contiguous().transpose(0, 1)  # [T, Hq, D] view of a [Hq, T, D] tensor
        q_shared = q[:, :1].expand(-1, hq, -1)  # head stride 0
        kv_shared = kv[:, :1].expand(-1, kv.shape[1], -1, -1)
        dense = dense_fa3(q, kv, bt, cu_q, sl)
        dense_fl = causal_flops([n], [n], hq, d)
        for S in args.strides:
            if args.serving:
                plan = serving_plan(cu_q, sl, S, dims, "serving").to("cuda")
                keys = step_keys(kv, bt, cu_q, sl, hq)
            else:
                plan, keys = plan_prefill(cu_q, sl, block_size=128, stride=S).to("cuda"), None
            flops = dense_fl / (2 * S)  # the strided causal GEMM
            cases = {name: (lambda m=m: m.antidiagonal_scores_paged(q, kv, bt, plan, keys=keys))
                     for name, m in mods.items()}
            cases["contiguous-pages"] = lambda: scoring.antidiagonal_scores_paged(q, kv, ordered, plan)
            cases["stages-3"] = lambda: scoring.antidiagonal_scores_paged(q, kv, bt, plan, num_stages=3)
            # the query in the executors' head-major copy: a super-row is S*D contiguous elements
            cases["head-major-q"] = lambda: scoring.antidiagonal_scores_paged(q_hm, kv, bt, plan)
            # Every query head reads head 0's query (head stride 0), or every KV head reads KV head
            # 0's keys: if the kernel is limited by keeping 132 distinct query tiles (or key
            # streams) in L2, the shared-input run is faster. Scores are wrong; timing only.
            cases["shared-q"] = lambda: scoring.antidiagonal_scores_paged(q_shared, kv, bt, plan)
            cases["shared-k"] = lambda: scoring.antidiagonal_scores_paged(q, kv_shared, bt, plan)
            for npg in args.programs:  # fewer SMs: does each one run faster (a shared limit)?
                cases[f"programs-{npg}"] = (lambda npg=npg: scoring.antidiagonal_scores_paged(
                    q, kv, bt, plan, num_programs=npg))
            # the warp-specialised Gluon prototype (scripts/scoring_ws_prototype.py)
            cases["ws-prototype"] = lambda: antidiagonal_scores_paged_ws(q, kv, bt, plan)
            cases["ws-prototype, no epilogue"] = lambda: antidiagonal_scores_paged_ws(q, kv, bt, plan, epilogue=False)
            for lag in (0, 1, 2, 3):  # its two compute warpgroups apart, `lag` chunks behind
                cases[f"ws-pingpong lag {lag}"] = (lambda lag=lag: antidiagonal_scores_paged_ws(
                    q, kv, bt, plan, pingpong=True, lag=lag))
            cases["ws-pingpong, no epilogue"] = lambda: antidiagonal_scores_paged_ws(
                q, kv, bt, plan, pingpong=True, epilogue=False)
            # whole tiles through TMA, from the keys the Triton kernel reads (with --serving the layer's own)
            cases["ws-prototype tma"] = lambda: antidiagonal_scores_paged_ws(q, kv, bt, plan, keys=keys, tma=True)
            cases["ws-pingpong tma"] = lambda: antidiagonal_scores_paged_ws(
                q, kv, bt, plan, pingpong=True, lag=0, keys=keys, tma=True)
            cases["ws-pingpong tma, no epilogue"] = lambda: antidiagonal_scores_paged_ws(
                q, kv, bt, plan, pingpong=True, lag=0, keys=keys, tma=True, epilogue=False)
            cases["ws-prototype tma, no epilogue"] = lambda: antidiagonal_scores_paged_ws(
                q, kv, bt, plan, keys=keys, tma=True, epilogue=False)
            # the ping-pong staggered: 64-column stages (4), or 32-column stages (8) for longer lags
            for bd, stages, lags in ((64, 4, (1, 2, 3)), (32, 8, (0, 2, 4, 6))):
                for lag in lags:
                    cases[f"ws-pingpong tma d{bd} lag {lag}"] = (
                        lambda bd=bd, stages=stages, lag=lag: antidiagonal_scores_paged_ws(
                            q, kv, bt, plan, pingpong=True, lag=lag, keys=keys, tma=True, block_d=bd,
                            num_stages=stages))
            plan64 = plan_prefill(cu_q, sl, block_size=128, stride=S, block_m=64).to("cuda")
            cases["head-major-q, block_m 64"] = lambda: scoring.antidiagonal_scores_paged(q_hm, kv, bt, plan64)
            cases["masked loads only"] = lambda: scoring.antidiagonal_scores_paged(q, kv, bt, plan, tma=False)
            cases["key copy alone"] = lambda: copy_keys(kv, bt, plan)
            want = scoring.antidiagonal_scores_paged(q, kv, bt, plan, keys=keys)
            if args.with_selection:  # on the kernel's scores, as bench_scoring.py runs it
                _, _, select, lists = pipeline(q, kv, bt, plan, threshold=0.9, keys=keys)
                cases[SELECTION] = lambda: lists(*select(want))
            for name in ("head-major-q", "baseline", "ws-prototype", "heads-outer", "no-load-masks",
                         "masked loads only", "flat-tma", "half-last-tile",
                         *(f"ws-pingpong lag {lag}" for lag in (0, 1, 2, 3)), "ws-prototype tma", "ws-pingpong tma",
                         *(k for k in cases if k.startswith("ws-pingpong tma d"))):
                if name in cases and (not args.only or name in args.only):
                    assert torch.allclose(cases[name](), want, rtol=1e-4, atol=1e-6), name
            cases = {k: f for k, f in cases.items() if not args.only or k in args.only or k == SELECTION}
            for fn in cases.values():
                fn()
            # dense FA3 in the same rounds: drift lands on all alike, ratios are taken per round
            times = time_interleaved({DENSE: dense, **cases}, rounds=args.rounds, rep=100)
            dense_ts = times.pop(DENSE)
            dense_ms = median(dense_ts)
            sel_ts = times.get(SELECTION)
            for name, ts in times.items():
                ms = median(ts)
                rec = dict(variant=name, shape="llama-3.1-8b", seq_len=n, stride=S, ms=ms, round_ms=ts,
                           gemm_tflops=flops / ms / 1e9, dense_fa3_ms=dense_ms, dense_round_ms=dense_ts,
                           dense_tflops=dense_fl / dense_ms / 1e9,
                           ratio=median(t / td for t, td in zip(ts, dense_ts)), serving=args.serving)
                if sel_ts and name != SELECTION:  # the round's own selection time
                    rec["ratio_with_selection"] = median((t + t_s) / td for t, t_s, td in zip(ts, sel_ts, dense_ts))
                records.append(rec)
                print({k: v for k, v in rec.items() if not k.endswith("round_ms")}, flush=True)
    write_records(Path(args.out), records, "python scripts/probe_scoring_variants.py " + " ".join(sys.argv[1:]))
    print("\n| N | S | variant | ms | GEMM TF/s | ratio to dense FA3 | with selection + page lists |"
          "\n|---|---|---|---|---|---|---|")
    for r in records:
        with_sel = f"{r['ratio_with_selection']:.4f}" if "ratio_with_selection" in r else ""
        print(f"| {r['seq_len']} | {r['stride']} | {r['variant']} | {r['ms']:.3f} | {r['gemm_tflops']:.0f} "
              f"| {r['ratio']:.4f} | {with_sel} |")


if __name__ == "__main__":
    main()
