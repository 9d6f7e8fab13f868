"""Record assembly of scripts/bench_e2e.py (CPU): fields the result checks read."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_e2e import add_model_args, resolve_model, to_records  # noqa: E402


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


def test_results_file_round_trip_keeps_settings_and_provenance():
    """A later run of one new setting rebuilds the earlier settings from the results file:
    the same records come back, each with the commit it was measured at."""
    from bench_e2e import measured_from_records

    ratio = json.dumps({"selection": "ratio", "ratio": 0.1})
    measured = {"dense": {**_m({8192: 250.0, 131072: 9000.0}, {8192: None, 131072: None}), "commit": "aaa"},
                ratio: {**_m({8192: 260.0, 131072: 3000.0}, {8192: None, 131072: 0.104}),
                        "mixed_note": "invalid"}}
    records = to_records("m", measured)
    results = {"commit": "bbb", "date": "2026-11-22", "records": records + [{"model": "other", "setting": "x"}]}
    rebuilt = measured_from_records(json.loads(json.dumps(results)), "m")
    assert set(rebuilt) == {"dense", ratio}
    again = to_records("m", rebuilt)
    key = lambda r: (r["setting"], r["prompt_len"])
    for a, b in zip(sorted(records, key=key), sorted(again, key=key)):
        assert {k: v for k, v in a.items() if k not in ("commit", "date")} == \
               {k: v for k, v in b.items() if k not in ("commit", "date")}
    by = {key(r): r for r in again}
    assert by[("dense", 8192)]["commit"] == "aaa"  # its own
    assert by[(ratio, 8192)]["commit"] == "bbb" and by[(ratio, 8192)]["date"] == "2026-11-22"  # the file's
    assert by[(ratio, 131072)]["mixed_note"] == "invalid"


def test_ttft_only_setting_pairs_with_dense_and_leaves_serving_fields_null():
    s16 = json.dumps({"selection": "ratio", "ratio": 0.1, "stride": 16})
    dense = _m({16384: 560.0, 131072: 11000.0}, {16384: None, 131072: None})
    new = dict(ttft={"131072": 5000.0}, density={"131072": 0.1}, density_per_layer={},
               decode_tok_s=None, decode_tpot_ms=None, mixed_mean_ttft_ms=None, mixed_tok_s=None)
    (rec,) = [r for r in to_records("m", {"dense": dense, s16: new}) if r["setting"] == s16]
    assert rec["ttft_speedup"] == pytest.approx(2.2) and rec["decode_tok_s"] is None
    assert rec["decode_tok_s_dense"] == 100.0


def test_density_is_null_when_the_server_ran_without_the_log():
    ratio = json.dumps({"selection": "ratio", "ratio": 0.1})
    unlogged = dict(_m({4096: 120.0, 131072: 5000.0}, {4096: None, 131072: None}), density_logged=False)
    measured = {"dense": _m({4096: 100.0, 131072: 9000.0}, {4096: None, 131072: None}), ratio: unlogged}
    recs = {(r["setting"], r["prompt_len"]): r for r in to_records("m", measured)}
    assert recs[("dense", 4096)]["density"] == 1.0
    assert recs[(ratio, 4096)]["density"] is None and recs[(ratio, 131072)]["density"] is None
    assert recs[(ratio, 131072)]["density_logged"] is False


def test_model_args_real_weights_need_no_extra_server_args(tmp_path):
    import argparse

    ap = argparse.ArgumentParser()
    add_model_args(ap)
    assert resolve_model(ap.parse_args(["--model", str(tmp_path / "qwen05")])) == (
        str(tmp_path / "qwen05"), "qwen05", [])


def test_serve_runs_keep_the_latency_records_of_the_same_model(tmp_path):
    from bench_e2e import measured_from_records, save

    lat = {"model": "m", "method": "vllm bench latency", "setting": "dense", "prompt_len": 131072,
           "ttft_ms": 10000.0}
    results = {"records": [lat]}
    measured = {"dense": _m({131072: 11000.0}, {131072: None})}
    assert measured_from_records(results, "m") == {}  # latency records are not serve settings
    save(tmp_path / "e2e.json", results, "m", measured)
    recs = json.loads((tmp_path / "e2e.json").read_text())["records"]
    assert lat in recs
    (serve,) = [r for r in recs if r is not lat and r["method"] == "vllm bench serve"]
    assert serve["ttft_ms"] == 11000.0
