"""bench_common.time_interleaved rotates the order each round; median is the usual median."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_common import median, time_interleaved  # noqa: E402


def test_time_interleaved_rotates_and_collects_every_round():
    calls = []

    def bench(fn):
        calls.append(fn())
        return float(len(calls))

    fns = {"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}
    times = time_interleaved(fns, rounds=4, bench=bench)
    assert calls == list("abc" "bca" "cab" "abc")
    assert times == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
