"""One attention layer of a long prompt prefilled in chunks, as vLLM's chunked prefill runs it:
XATTN (scoring + selection + page lists + executor + copies) vs dense FA3 per chunk, same run.

    python scripts/bench_chunked_prefill.py --out benchmarks/results/chunked_prefill_h100.json

Chunk c holds queries [c*C, (c+1)*C) over keys [0, (c+1)*C) of one paged cache. Per chunk:
each side timed with triton.testing.do_bench (median); then all chunks back to back in one
timed call (what a layer costs over the whole prompt, launch gaps included); the host plan
per scheduler step (``SparseStep.from_host_plan``, shared by all layers); and with
``--profile`` a torch.profiler kernel table of the last chunk.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, dense_fa3, paged_inputs, write_records  # noqa: E402
from bench_attention import profile_layer  # noqa: E402

from vllm_xattn.backends.executors import FA3  # noqa: E402
from vllm_xattn.backends.sparse_prefill import ScratchPool, SparsePrefill, SparseStep  # noqa: E402
from vllm_xattn.config import XAttnConfig  # noqa: E402
from vllm_xattn.kernels import min_scoring_tiles, plan_prefill  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/chunked_prefill_h100.json")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=8192, help="vLLM's max_num_batched_tokens")
    ap.add_argument("--config", default='{"selection": "ratio", "ratio": 0.1}',
                    help="xattn knobs (JSON); the rest are the defaults")
    ap.add_argument("--profile", metavar="DIR")
    ap.add_argument("--min-tiles", type=int, default=None,
                    help="plan_prefill's min_tiles (default: what the XATTN builder passes on this GPU; 0: off)")
    args = ap.parse_args()

    dims = SHAPES[args.shape]
    hq, hkv, d = dims["num_q_heads"], dims["num_kv_heads"], dims["head_dim"]
    N, C = args.seq_len, args.chunk
    cfg = XAttnConfig(**json.loads(args.config))
    q, kv, bt, _, _ = paged_inputs([N], [N], **dims)
    pool = ScratchPool(max_tokens=C, max_reqs=1, max_seq_len=N, num_q_heads=hq, head_dim=d,
                       dtype=q.dtype, cfg=cfg, page_size=kv.shape[2], device=q.device, num_kv_heads=hkv)
    sp = SparsePrefill(cfg, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5,
                       thresholds=None)
    sel_heads = cfg.selection_heads(hq, hkv)
    min_tiles = args.min_tiles
    if min_tiles is None:
        min_tiles = min_scoring_tiles(torch.cuda.get_device_properties(0).multi_processor_count, hq)
    chunks, plan_ms = [], []
    for c in range(N // C):
        cu = torch.tensor([0, C], dtype=torch.int32)
        sl = torch.tensor([(c + 1) * C], dtype=torch.int32)
        t0 = time.perf_counter()
        step = SparseStep.from_host_plan(plan_prefill(cu, sl, block_size=cfg.block_size, stride=cfg.stride,
                                                      min_tiles=min_tiles),
                                         block_table=bt, tok_start=0, tok_end=C,
                                         selection_heads=sel_heads, device="cuda", executor=FA3)
        plan_ms.append((time.perf_counter() - t0) * 1e3)
        qc = q[c * C:(c + 1) * C]
        chunks.append((c, qc, cu, sl, step, torch.empty_like(qc)))
    records = []
    for c, qc, cu, sl, step, o in chunks:
        density = int(sp.run(qc, kv, step, o, pool).sum()) / (step.candidate_blocks * hq)
        x_ms = do_bench(lambda: sp.run(qc, kv, step, o, pool), warmup=3, rep=30)
        d_ms = do_bench(dense_fa3(qc, kv, bt, cu, sl), warmup=3, rep=30)
        records.append(dict(chunk=c, context=c * C, density=density, ms=x_ms, dense_fa3_ms=d_ms,
                            plan_host_ms=plan_ms[c], block_m=step.plan.block_m))
        print(records[-1], flush=True)
    dense_runs = [dense_fa3(qc, kv, bt, cu, sl) for _, qc, cu, sl, _, _ in chunks]

    def all_xattn():
        for _, qc, _, _, step, o in chunks:
            sp.run(qc, kv, step, o, pool)

    def all_dense():
        for run in dense_runs:
            run()

    x_all, d_all = do_bench(all_xattn, warmup=2, rep=20), do_bench(all_dense, warmup=2, rep=20)
    if args.profile:
        _, qc, _, _, step, o = chunks[-1]
        profile_layer(Path(args.profile) / f"profile_chunked_{args.shape}_{N}_c{C}_last.txt",
                      lambda: sp.run(qc, kv, step, o, pool))
    summary = dict(shape=args.shape, seq_len=N, chunk=C, config=cfg.model_dump(mode="json", exclude_none=True),
                   xattn_all_chunks_ms=x_all, dense_all_chunks_ms=d_all, speedup=d_all / x_all,
                   sum_chunk_ms=sum(r["ms"] for r in records),
                   sum_chunk_dense_ms=sum(r["dense_fa3_ms"] for r in records),
                   plan_host_ms_total=sum(plan_ms), min_tiles=min_tiles, **dims)
    print(summary, flush=True)
    write_records(Path(args.out), records, "python scripts/bench_chunked_prefill.py " + " ".join(sys.argv[1:]),
                  summary=summary)


if __name__ == "__main__":
    main()
