"""The ``xattn`` knobs, read from vLLM's ``additional_config={"xattn": {...}}``.

Validation happens once at engine start (see ``plugin.py``) so that a typo fails
before any request, with a message naming the field and the allowed values.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_KEY = "xattn"

# Where the sparse path starts to beat dense FA3 per layer at the densities real text gives
# (15-30 % of blocks): about 8K tokens for a Llama-3.1-8B layer, 12K-16K for a Qwen2.5-0.5B
# layer (benchmarks/results/crossover_h100.json); 16K is past both.
DEFAULT_MIN_SPARSE_TOKENS = 16384


class XAttnConfig(BaseModel):
    """XAttention settings. Every field has a default; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Stride 16 and threshold 0.98: on Qwen2.5-0.5B needle accuracy 96.7 vs dense 97.5
    # (density 0.355; S=8 at 0.98: 97.5, density 0.340), while S=16 scoring costs half of
    # S=8's. Lower thresholds lost more: 0.9 / 0.95 gave -5.0 / -2.5 points at S=16 and
    # -10.8 / -3.3 at S=8 (benchmarks/results/accuracy_h100.json). Lower it for speed where
    # it was measured safe.
    stride: Literal[4, 8, 16, 32] = Field(
        16, description="Antidiagonal stride S: scoring costs 1/(2S) of dense attention."
    )
    threshold: float = Field(
        0.98, gt=0.0, le=1.0,
        description="Fraction of the estimated attention mass each query block keeps "
        "(selection='threshold'); 1.0 keeps every block (dense).",
    )
    block_size: Literal[64, 128] = Field(128, description="Query/key block size B.")
    selection: Literal["threshold", "topk", "ratio"] = Field(
        "threshold", description="Block selection rule."
    )
    topk: int | None = Field(
        None, ge=1, description="Blocks kept per query block (selection='topk'), "
        "sink and diagonal included."
    )
    ratio: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Fraction of causal blocks kept per query block (selection='ratio').",
    )
    granularity: Literal["head", "kv_group"] = Field(
        "head", description="Select per query head, or once per KV group (summed scores)."
    )
    min_sparse_tokens: int = Field(
        DEFAULT_MIN_SPARSE_TOKENS, ge=1,
        description="Sequence length (context + chunk) from which a prefill chunk "
        "takes the sparse path; shorter ones run dense.",
    )
    dense_layers: int = Field(0, ge=0, description="The first N layers always run dense.")
    executor: Literal["auto", "fa3", "flashinfer"] = Field(
        "auto", description="Block-sparse executor: 'fa3' (vLLM's FA3 varlen kernel), "
        "'flashinfer' (FlashInfer fa2 paged prefill), or 'auto': FA3 where vLLM runs FA3 "
        "(Hopper; measured faster there, benchmarks/results/attention_executors_h100.json), "
        "FlashInfer elsewhere.",
    )
    threshold_file: Path | None = Field(
        None,
        description='JSON file {"thresholds": [[tau per query head] per layer]} with '
        "per-layer, per-head thresholds (overrides `threshold`).",
    )

    @model_validator(mode="after")
    def _check_selection_args(self) -> XAttnConfig:
        if self.selection == "topk" and self.topk is None:
            raise ValueError("selection='topk' needs `topk` (an integer >= 1)")
        if self.selection == "ratio" and self.ratio is None:
            raise ValueError("selection='ratio' needs `ratio` (0 < ratio <= 1)")
        if self.threshold_file is not None:
            load_threshold_table(self.threshold_file)  # fail now, not in a worker
        return self

    def selection_heads(self, num_q_heads: int, num_kv_heads: int) -> int:
        """Heads that each get their own block selection (and mini-requests): every query
        head, or one per KV group under ``granularity: kv_group``."""
        return num_kv_heads if self.granularity == "kv_group" else num_q_heads


def load_threshold_table(path: Path | str) -> list[list[float]]:
    """Read and check a per-layer, per-head threshold table."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"threshold_file {str(path)!r} is not a readable JSON file: {e}") from e
    table = data.get("thresholds") if isinstance(data, dict) else None
    if (
        not isinstance(table, list)
        or not table
        or not all(isinstance(row, list) and row for row in table)
        or len({len(row) for row in table}) != 1
    ):
        raise ValueError(
            f"threshold_file {str(path)!r} must hold "
            '{"thresholds": [[tau per query head] per layer]} with equal-length rows'
        )
    for li, row in enumerate(table):
        for hi, tau in enumerate(row):
            if not isinstance(tau, (int, float)) or not math.isfinite(tau) or not 0 < tau <= 1:
                raise ValueError(
                    f"threshold_file {str(path)!r}: thresholds[{li}][{hi}] = {tau!r}, "
                    "allowed 0 < tau <= 1"
                )
    return [[float(t) for t in row] for row in table]


def _format_errors(err: ValidationError) -> str:
    allowed = ", ".join(XAttnConfig.model_fields)
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys: {allowed}"
        got = "" if e["type"] == "value_error" else f" (got {e.get('input')!r})"
        lines.append(f"  {field}: {msg}{got}")
    return "\n".join(lines)


def parse_xattn_config(raw: Any) -> XAttnConfig:
    """``additional_config["xattn"]`` (dict or None) -> validated config."""
    if raw is None:
        return XAttnConfig()
    if isinstance(raw, XAttnConfig):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(
            f'additional_config["{CONFIG_KEY}"] must be a JSON object, got {type(raw).__name__}'
        )
    try:
        return XAttnConfig(**raw)
    except ValidationError as e:
        raise ValueError(
            f'Invalid additional_config["{CONFIG_KEY}"]:\n{_format_errors(e)}'
        ) from None


def xattn_config_from_vllm(vllm_config: Any) -> XAttnConfig:
    """The validated ``xattn`` section of a VllmConfig (defaults if absent)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    return parse_xattn_config(raw)
