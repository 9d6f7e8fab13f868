"""scripts/ncu_scoring.py: the Nsight Compute text reports the scoring diagnosis cites parse into
the metrics they print (checked on the committed H100 reports)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from ncu_scoring import GEMM_CASES, parse_report  # noqa: E402

REPORTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "logs" / "ncu_a408d7c"


def test_scoring_report_parses_to_its_printed_values():
    (k,) = parse_report((REPORTS / "ncu_score_real_s8.txt").read_text())
    assert (k["kernel"], k["grid"], k["block"]) == ("_score_kernel", 132, 256)
    m = k["metrics"]
    assert m["Duration"] == [1.49, "ms"]
    assert m["L2 Hit Rate"] == [50.71, "%"]
    assert m["DRAM Throughput"] == [46.93, "%"]
    assert m["Memory Throughput (Tbyte/s)"] == [1.57, "Tbyte/s"]  # printed again under another unit
    assert m["Registers Per Thread"][0] == 252


def test_gemm_report_labels_its_four_launches_in_order():
    ks = parse_report((REPORTS / "ncu_gemm_heads.txt").read_text())
    assert [k.get("case") for k in ks] == list(GEMM_CASES)
    assert [k["kernel"] for k in ks] == ["_gemm_rowsum_heads"] * 2 + ["_gemm_rowsum_heads_tma"] * 2


def test_unrelated_lines_are_ignored():
    text = "==PROF== Connected\n  _k (4, 1, 1)x(128, 1, 1), Context 1\n    L2 Hit Rate   %   12.5\n    Foo  x  1\n"
    assert parse_report(text) == [dict(kernel="_k", grid=4, block=128, metrics={"L2 Hit Rate": [12.5, "%"]})]
