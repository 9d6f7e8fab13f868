"""scripts/scoring_launch_overhead.py runs on a GPU only; here: its cases name known layer shapes
and strides the plan accepts (a typo would otherwise surface on the GPU)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_common import SHAPES  # noqa: E402
from scoring_launch_overhead import CASES  # noqa: E402

from vllm_xattn.kernels import plan_prefill  # noqa: E402


def test_cases_are_known_shapes_and_valid_plans():
    for shape, n, S in CASES:
        assert shape in SHAPES
        plan = plan_prefill([0, n], [n], block_size=128, stride=S)
        assert plan.key_copy_rows == n  # every case times the TMA path with its copy
