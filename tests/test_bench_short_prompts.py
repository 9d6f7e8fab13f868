"""scripts/bench_short_prompts.py (CPU): the paired summary is the median of per-round ratios,
so a slow round that hits both servers does not move it, and a real overhead does."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_short_prompts import paired_summary  # noqa: E402


def test_drift_shared_by_both_servers_cancels():
    # Round 2 is slow for both (a 20 -> 36 ms jump like the one seen between server starts).
    rounds = [dict(dense=20.0, xattn=20.2), dict(dense=36.0, xattn=36.4), dict(dense=20.1, xattn=20.3)]
    s = paired_summary(rounds)
    # ratios 1.0100, 1.0111, 1.0100 (rounds 1 and 3 by 20.2/20.0 and 20.3/20.1)
    assert s["ratio_median"] == pytest.approx(20.2 / 20.0)
    assert s["ratio_min"] == pytest.approx(20.3 / 20.1) and s["ratio_max"] == pytest.approx(36.4 / 36.0)
    assert (s["dense_ms"], s["xattn_ms"], s["rounds"]) == (20.1, 20.3, 3)


def test_overhead_shows():
    rounds = [dict(dense=20.0, xattn=22.0)] * 4
    assert paired_summary(rounds)["ratio_median"] == pytest.approx(1.10)
