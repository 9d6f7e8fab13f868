"""scripts/bench_latency.py: the command it wraps and how runs pair with dense."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_latency import latency_command, pair_records  # noqa: E402


def test_command_names_backend_knobs_and_chunk():
    cmd = latency_command("/m", '{"ratio": 0.1}', length=4096, iters=3, warmup=1,
                          model_args=["--load-format", "dummy"], max_num_batched_tokens=8192,
                          out_json="/o.json")
    assert cmd[:3] == ["vllm", "bench", "latency"]
    assert cmd[cmd.index("--input-len") + 1] == "4096" and cmd[cmd.index("--output-len") + 1] == "1"
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "8192"
    assert cmd[cmd.index("--attention-backend") + 1] == "XATTN"
    assert '{"xattn": {"ratio": 0.1}}' in cmd
    dense = latency_command("/m", "dense", length=4096, iters=3, warmup=1, model_args=[],
                            max_num_batched_tokens=None, out_json="/o.json")
    assert "--max-num-batched-tokens" not in dense and "FLASH_ATTN" in dense


def test_pairs_medians_of_runs_with_dense():
    run = lambda avg: {"avg_latency": avg, "latencies": [avg], "max_num_batched_tokens": 16384}
    runs = {"dense": [run(10.0), run(10.4), run(10.2)], '{"ratio": 0.1}': [run(4.0), run(4.4), run(4.2)]}
    recs = pair_records("m", 131072, runs, method="vllm bench latency")
    x = next(r for r in recs if r["setting"] != "dense")
    assert x["ttft_ms"] == pytest.approx(4200) and x["ttft_ms_dense"] == pytest.approx(10200)
    assert x["ttft_speedup"] == pytest.approx(10.2 / 4.2) and x["density"] is None
    assert x["max_num_batched_tokens"] == [16384] and x["knobs"] == {"ratio": 0.1}


def test_records_merge_into_a_results_file_replacing_only_their_key(tmp_path):
    import json

    from bench_common import merge_records

    key = ("model", "method", "setting", "prompt_len", "max_num_batched_tokens")
    serve = {"model": "m", "method": "vllm bench serve", "setting": "dense", "prompt_len": 8, "ttft_ms": 1.0}
    old = {"model": "m", "method": "vllm bench latency", "setting": "dense", "prompt_len": 8,
           "max_num_batched_tokens": [8192], "ttft_ms": 2.0}
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"note": "kept", "records": [serve, old]}))
    new = dict(old, ttft_ms=3.0)
    other_chunk = dict(old, max_num_batched_tokens=[16384], ttft_ms=4.0)
    merge_records(path, [new, other_chunk], key)
    got = json.loads(path.read_text())
    assert got["note"] == "kept"
    assert sorted(r["ttft_ms"] for r in got["records"]) == [1.0, 3.0, 4.0]


def test_jit_compiles_reads_vllms_jit_monitor_warnings():
    from bench_latency import jit_compiles

    log = ("INFO Kernel JIT monitor activated; monitored JIT compilations during inference will use mode=warn.\n"
           "WARNING 11-23 [jit_monitor.py:135] Triton kernel JIT compilation during inference: _score_kernel "
           "(constants={B=128}). This causes a latency spike; consider extending warmup to cover this shape/config.\n"
           "WARNING Triton kernel JIT compilation during inference: _select_kernel. This causes ...\n")
    assert jit_compiles(log) == ["_score_kernel", "_select_kernel"]
    assert jit_compiles("INFO XATTN sparse prefill running\n") == []
