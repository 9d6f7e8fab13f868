"""scripts/eval_longctx.py (CPU): which records the results mark as the default config."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from eval_longctx import is_default  # noqa: E402


@pytest.mark.parametrize("setting, expected", [
    ("dense", False),
    ("{}", True),
    ('{"min_sparse_tokens": 4096}', True),  # the evaluation's own override does not count
    ('{"stride": 16, "threshold": 0.98}', True),  # the defaults spelled out
    ('{"stride": 8}', False),
    ('{"threshold": 0.9}', False),
])
def test_is_default(setting, expected):
    assert is_default(setting) is expected
