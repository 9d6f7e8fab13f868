"""Record assembly of scripts/bench_e2e.py (CPU): fields the result checks read."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_e2e import to_records  # noqa: E402


def _m(ttft, density):
    m = dict(ttft=ttft, density=density, density_per_layer={}, decode_tok_s=100.0,
             decode_tpot_ms=10.0, mixed_mean_ttft_ms=5.0, mixed_tok_s=50.0)
    return json.loads(json.dumps(m))  # as stored in measured.json: str keys


def test_records_pair_each_setting_with_dense_and_use_measured_density():
    ratio = json.dumps({"selection": "ratio", "ratio": 0.1})
    measured = {"dense": _m({4096: 100.0, 131072: 9000.0}, {4096: None, 131072: None}),
                ratio: _m({4096: 101.0, 131072: 3000.0}, {4096: None, 131072: 0.104})}
    recs = {(r["setting"], r["prompt_len"]): r for r in to_records("m", measured)}
    long = recs[(ratio, 131072)]
    assert long["ttft_ms_dense"] == 9000.0 and long["ttft_speedup"] == pytest.approx(3.0)
    assert long["density"] == 0.104 and long["knobs"] == {"selection": "ratio", "ratio": 0.1}
    assert recs[(ratio, 4096)]["density"] == 1.0  # below min_sparse_tokens: ran dense
    assert recs[("dense", 131072)]["ttft_speedup"] == 1.0
    assert all(r["model"] == "m" for r in recs.values())
