"""scripts/profile_prefill.py's trace summary on a synthetic trace (times in us)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from profile_prefill import kernel_kind, summarize_trace  # noqa: E402


def _k(name, ts, dur):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_summary_splits_busy_idle_and_kinds():
    events = [
        _k("void cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>", 0, 100),
        _k("_score_kernel", 50, 100),  # overlaps the first: union 0..150
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10_000},  # not a kernel
        _k("ampere_bf16_gemm", 400, 100),  # 250 us gap (short)
        _k("_copy_tokens_heads_kernel", 1500, 500),  # 1000 us gap (long at 0.5 ms)
    ]
    s = summarize_trace(events)
    assert s["span_ms"] == pytest.approx(2.0)
    assert s["busy_ms"] == pytest.approx(0.75)
    assert s["idle_ms"] == pytest.approx(1.25)
    assert s["idle_in_long_gaps_ms"] == pytest.approx(1.0) and s["long_gaps"] == 1
    assert s["kernel_ms_by_kind"] == pytest.approx({"flash_attn": 0.1, "xattn_triton": 0.6, "other": 0.1})
    assert next(iter(s["top_kernels_ms"])) == "_copy_tokens_heads_kernel"


def test_kinds_and_empty_trace():
    assert kernel_kind("void flash::prepare_varlen_num_blocks_kernel<32>") == "flash_attn"
    assert kernel_kind("_select_kernel") == "xattn_triton"
    assert kernel_kind("triton_poi_fused_mul_silu_0") == "other"
    with pytest.raises(ValueError):
        summarize_trace([{"cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}])
