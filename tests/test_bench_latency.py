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
