"""Optional log of the density the sparse path really ran at (``XATTN_DENSITY_LOG=DIR``).

Off by default. When on, each sparse layer call records its selection counts (the device
tensor [heads, query blocks], no sync) and its candidate count per head (host int from the
plan). At the next ``build()`` the metadata builder flushes: the previous step's per-head sums
start copying to pinned host memory behind a CUDA event (no sync, so async scheduling keeps
overlapping steps), and earlier steps whose copy has finished are written. A record therefore
reaches the file one or two steps later (at process exit at the latest). Each process appends
JSON lines to ``DIR/density-<pid>.jsonl``:
``{"layer": 3, "tokens": 8192, "head_offset": 0, "selected_per_head": [...],
"candidates_per_head": 456, "selected": 123, "candidates": 456 * heads}``; ``head_offset`` is the
rank's first query head under tensor parallelism, so ranks' logs merge into per-head figures.
Benchmarks and the tensor-parallel test read them with ``read_density``.
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
        self.pending: list[tuple[int, int, int, torch.Tensor, int]] = []  # this step's layers
        # Earlier steps: (records without their counts, per-head sums on the host, copy event).
        self.copying: list[tuple[list[tuple], torch.Tensor, object]] = []
        atexit.register(self.flush, wait=True)

    def record(self, layer: int, tokens: int, head_offset: int, counts: torch.Tensor,
               candidates_per_head: int) -> None:
        """``counts``: int [heads, query blocks], selected key blocks per row (device)."""
        self.pending.append((layer, tokens, head_offset, counts, candidates_per_head))

    @staticmethod
    def _to_host(sums: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Start copying ``sums`` to the host; returns (host tensor, event to query, or None
        if the copy is already done)."""
        if not sums.is_cuda:
            return sums, None
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def flush(self, wait: bool = False) -> None:
        """Queue the pending step's sums for the host; write every queued step whose copy is
        done (all of them, waiting, with ``wait``)."""
        if self.pending:
            sums = torch.cat([p[3].sum(1, dtype=torch.int64) for p in self.pending])
            host, event = self._to_host(sums)
            meta = [(layer, tokens, offset, counts.shape[0], cand)
                    for layer, tokens, offset, counts, cand in self.pending]
            self.copying.append((meta, host, event))
            self.pending = []
        while self.copying:
            meta, host, event = self.copying[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._write(meta, host.tolist())
            self.copying.pop(0)

    def _write(self, meta: list[tuple], per_head: list[int]) -> None:
        with open(self.path, "a") as f:
            i = 0
            for layer, tokens, offset, heads, cand in meta:
                sel, i = per_head[i: i + heads], i + heads
                f.write(json.dumps(dict(layer=layer, tokens=tokens, head_offset=offset,
                                        selected_per_head=sel, candidates_per_head=cand,
                                        selected=sum(sel), candidates=cand * len(sel))) + "\n")


_log: DensityLog | None = None


def density_log() -> DensityLog | None:
    """The process's log if ``XATTN_DENSITY_LOG`` is set, else None."""
    global _log
    if _log is None and os.environ.get(ENV_VAR):
        _log = DensityLog(os.environ[ENV_VAR])
    return _log


def read_density(directory: str | Path) -> dict:
    """Totals of every record under ``directory`` (all processes, e.g. tensor-parallel ranks):
    overall density, per layer, and per (layer, global query head): selected / candidate
    causal blocks over rows and steps."""
    sel, cand, by_layer, by_head = 0, 0, {}, {}
    for p in sorted(Path(directory).glob("density-*.jsonl")):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            sel += r["selected"]
            cand += r["candidates"]
            s, c = by_layer.get(r["layer"], (0, 0))
            by_layer[r["layer"]] = (s + r["selected"], c + r["candidates"])
            for h, n in enumerate(r["selected_per_head"]):
                key = (r["layer"], r["head_offset"] + h)
                s, c = by_head.get(key, (0, 0))
                by_head[key] = (s + n, c + r["candidates_per_head"])
    return dict(density=sel / cand if cand else None, selected=sel, candidates=cand,
                per_layer={k: s / c for k, (s, c) in sorted(by_layer.items()) if c},
                per_head={k: s / c for k, (s, c) in sorted(by_head.items()) if c})
