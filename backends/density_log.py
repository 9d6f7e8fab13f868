"""Optional log of the density the sparse path really ran at (``XATTN_DENSITY_LOG=DIR``).

Off by default. When on, each sparse layer call records its selected-block count (a device
scalar, no sync) and its candidate count (host int from the plan); the metadata builder
flushes the previous step's records at the next ``build()``, one host sync per scheduler
step. Each process appends JSON lines to ``DIR/density-<pid>.jsonl``:
``{"layer": 3, "tokens": 8192, "selected": 123, "candidates": 456}``. Benchmarks read them
with ``read_density``.
"""
from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import torch

ENV_VAR = "XATTN_DENSITY_LOG"


class DensityLog:
    def __init__(self, directory: str):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"density-{os.getpid()}.jsonl"
        self.pending: list[tuple[int, int, torch.Tensor, int]] = []
        atexit.register(self.flush)

    def record(self, layer: int, tokens: int, selected: torch.Tensor, candidates: int) -> None:
        self.pending.append((layer, tokens, selected, candidates))

    def flush(self) -> None:
        if not self.pending:
            return
        counts = torch.stack([p[2].reshape(()).to(torch.int64) for p in self.pending]).tolist()
        with open(self.path, "a") as f:
            for (layer, tokens, _, cand), sel in zip(self.pending, counts):
                f.write(json.dumps(dict(layer=layer, tokens=tokens, selected=sel,
                                        candidates=cand)) + "\n")
        self.pending.clear()


_log: DensityLog | None = None


def density_log() -> DensityLog | None:
    """The process's log if ``XATTN_DENSITY_LOG`` is set, else None."""
    global _log
    if _log is None and os.environ.get(ENV_VAR):
        _log = DensityLog(os.environ[ENV_VAR])
    return _log


def read_density(directory: str | Path) -> dict:
    """Totals of every record under ``directory``: overall density and per-layer density
    (selected / candidate causal blocks, over all heads, rows and steps)."""
    sel, cand, by_layer = 0, 0, {}
    for p in sorted(Path(directory).glob("density-*.jsonl")):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            sel += r["selected"]
            cand += r["candidates"]
            s, c = by_layer.get(r["layer"], (0, 0))
            by_layer[r["layer"]] = (s + r["selected"], c + r["candidates"])
    return dict(density=sel / cand if cand else None, selected=sel, candidates=cand,
                per_layer={k: s / c for k, (s, c) in sorted(by_layer.items()) if c})
