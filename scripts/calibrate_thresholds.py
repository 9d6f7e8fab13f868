"""Per-layer, per-head thresholds for a model from its captured Q/K (vllm_xattn.calibration).

    python scripts/capture_qkv.py --model QWEN_DIR --text essays.txt --tokens 32768 --out /tmp/cap
    python scripts/calibrate_thresholds.py --capture /tmp/cap --target 0.95 \
        --out thresholds_qwen05.json --report benchmarks/results/calibration_h100.json

``--out`` is a ``threshold_file`` for the config ({"thresholds": [[tau per query head] per
layer]}, global head order, so tensor-parallel ranks take their slice); the report holds each
head's threshold, kept true mass and density, and the mean density.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_records  # noqa: E402

from vllm_xattn.calibration import DEFAULT_GRID, calibrate_layer  # noqa: E402
from vllm_xattn.config import XAttnConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--capture", required=True, help="folder of layer_XX.pt from capture_qkv.py")
    ap.add_argument("--target", type=float, default=0.95, help="mean true attention mass to keep")
    ap.add_argument("--stride", type=int, default=XAttnConfig().stride)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--sample-blocks", type=int, default=16)
    ap.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_GRID))
    ap.add_argument("--out", required=True, help="threshold_file to write")
    ap.add_argument("--report", default="benchmarks/results/calibration_h100.json")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    table, records = [], []
    for f in sorted(Path(args.capture).glob("layer_*.pt")):
        cap = torch.load(f)
        got = calibrate_layer(cap["q"].to(dev), cap["k"].to(dev), target=args.target,
                              stride=args.stride, block_size=args.block_size,
                              sample_blocks=args.sample_blocks, grid=args.grid)
        table.append(got["thresholds"])
        records.append(dict(layer=len(table) - 1, name=cap.get("layer"), seq_len=cap["q"].shape[0],
                            stride=args.stride, target=args.target, **got))
        print(f"layer {len(table) - 1}: tau {got['thresholds']}, mean density "
              f"{sum(got['density']) / len(got['density']):.3f}", flush=True)
    Path(args.out).write_text(json.dumps({"thresholds": table}))
    dens = [x for r in records for x in r["density"]]
    records.append({"summary": dict(layers=len(table), mean_density=sum(dens) / len(dens),
                                    target=args.target, stride=args.stride, grid=args.grid)})
    write_records(Path(args.report), records,
                  "python scripts/calibrate_thresholds.py " + " ".join(sys.argv[1:]))
    print(f"mean density {sum(dens) / len(dens):.3f} over {len(table)} layers; wrote {args.out}")


if __name__ == "__main__":
    main()
