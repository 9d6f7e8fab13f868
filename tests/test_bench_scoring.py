"""scripts/bench_scoring.py's timing loop on CPU (kernels in the Triton interpreter, fake
timings): each record's ratio is the median of the rounds' pipeline / dense ratios."""
import functools
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_common  # noqa: E402
import bench_scoring  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU variant (Triton interpreter)")


def test_records_take_medians_of_within_round_ratios(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_scoring, "paged_inputs", functools.partial(bench_common.paged_inputs, device="cpu"))
    monkeypatch.setattr(bench_scoring, "dense_fa3", lambda *a, **k: (lambda: None))
    # round r: dense 10 + r ms, the pipeline 1 ms but 5 ms in round 1 (an outlier the median drops)
    fake = {"dense": [10.0, 11.0, 12.0], "run": [1.0, 5.0, 1.2], "scoring": [0.8, 0.8, 0.8],
            "selection": [0.1] * 3, "lists": [0.05] * 3}
    seen = []

    def fake_interleaved(fns, rounds, rep):
        seen.append(sorted(fns))
        return {k: fake[k][:rounds] for k in fns}

    monkeypatch.setattr(bench_scoring, "time_interleaved", fake_interleaved)
    out = tmp_path / "s.json"
    monkeypatch.setattr(sys, "argv", ["bench_scoring.py", "--seq-lens", "512", "--shapes", "qwen2.5-0.5b",
                                      "--strides", "16", "--skip-check", "--batch", "1", "--rounds", "3",
                                      "--out", str(out)])
    bench_scoring.main()
    assert seen == [["dense", "lists", "run", "scoring", "selection"]]
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["ratio"] == pytest.approx(1.2 / 12.0)  # median of 0.1, 0.4545, 0.1
    assert rec["dense_fa3_ms"] == 11.0 and rec["ms"] == 1.2 and rec["rounds"] == 3
    assert 0.0 < rec["density"] <= 1.0 and rec["round_ms"]["dense"] == [10.0, 11.0, 12.0]
