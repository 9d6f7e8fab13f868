"""End to end on a GPU: XATTN vs FLASH_ATTN through LLM.generate and `vllm serve`."""
import json
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.e2e_util import ENV, generate_in_subprocess, save_log, write_llama_config

pytestmark = pytest.mark.gpu


def _prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 32000) for _ in range(n)] for n in lengths]


def test_llm_generate_matches_flash_attn(tmp_path):
    """Short and long prompts, one longer than max_num_batched_tokens (chunked
    prefill), a repeated prefix (prefix caching): identical greedy tokens."""
    model = write_llama_config(tmp_path / "llama")
    prompts = _prompts([7, 40, 300, 3000, 9000, 20000, 12])
    prompts.append(prompts[4][:8192] + prompts[1])  # shares a cached 8K prefix
    common = dict(model=str(model), load_format="dummy", skip_tokenizer_init=True,
                  max_model_len=32768, max_num_batched_tokens=8192, max_num_seqs=16,
                  enable_prefix_caching=True, gpu_memory_utilization=0.5, seed=0)
    ref, _ = generate_in_subprocess({**common, "attention_backend": "FLASH_ATTN"}, prompts, 24)
    got, log = generate_in_subprocess(
        {**common, "attention_backend": "XATTN",
         "additional_config": {"xattn": {"threshold": 0.9}}}, prompts, 24)
    assert got == ref
    assert "XATTN backend active" in log, "engine did not run the XATTN backend"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_completions(tmp_path):
    model = write_llama_config(tmp_path / "llama")
    port = _free_port()
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
           "--attention-backend", "XATTN", "--additional-config", '{"xattn": {"threshold": 0.9}}',
           "--load-format", "dummy", "--skip-tokenizer-init", "--max-model-len", "8192",
           "--gpu-memory-utilization", "0.4", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, log_path.read_text()[-6000:]
            assert time.time() < deadline, "server did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(3)
        body = json.dumps({"model": str(model), "prompt": list(range(100, 1100)),
                           "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            reply = json.loads(r.read())
        assert reply["usage"]["completion_tokens"] == 8
        assert reply["usage"]["prompt_tokens"] == 1000
        assert "XATTN backend active" in log_path.read_text(), "server did not run XATTN"
    finally:
        save_log("serve-XATTN", log_path.read_text())
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_sparse_path_threshold_one_matches_flash_attn(tmp_path):
    """threshold 1.0 keeps every block: the sparse path (scoring, selection, FA3 over
    per-head page lists) must give FLASH_ATTN's greedy tokens. min_sparse_tokens is low so
    that the 9K/20K prompts and the prefix-cache hit run sparse, chunked at 8K."""
    model = write_llama_config(tmp_path / "llama")
    prompts = _prompts([7, 40, 3000, 9000, 20000, 12], seed=1)
    prompts.append(prompts[3][:8192] + prompts[2])
    common = dict(model=str(model), load_format="dummy", skip_tokenizer_init=True,
                  max_model_len=32768, max_num_batched_tokens=8192, max_num_seqs=16,
                  enable_prefix_caching=True, gpu_memory_utilization=0.5, seed=0)
    ref, _ = generate_in_subprocess({**common, "attention_backend": "FLASH_ATTN"}, prompts, 16)
    xcfg = {"threshold": 1.0, "min_sparse_tokens": 4096}
    got, log = generate_in_subprocess(
        {**common, "attention_backend": "XATTN", "additional_config": {"xattn": xcfg}}, prompts, 16)
    assert "XATTN sparse prefill running" in log, "the sparse path did not run"
    assert got == ref
    # and a real sparse selection runs end to end
    got9, _ = generate_in_subprocess(
        {**common, "attention_backend": "XATTN",
         "additional_config": {"xattn": {"threshold": 0.9, "min_sparse_tokens": 4096}}},
        prompts, 16)
    assert [len(t) for t in got9] == [16] * len(prompts)


def _kv_cache_tokens(log: str) -> int:
    return int(re.findall(r"GPU KV cache size: ([\d,]+) tokens", log)[-1].replace(",", ""))


def test_kv_capacity_and_128k_prompt(tmp_path):
    """Same gpu_memory_utilization: XATTN's KV-cache capacity within 3 % of FLASH_ATTN's
    (its scratch is reserved in the profiling pass), and a 128K prompt at vLLM's default
    max_num_batched_tokens runs sparse without running out of memory."""
    model = write_llama_config(tmp_path / "llama")
    prompts = _prompts([131000, 50], seed=2)
    common = dict(model=str(model), load_format="dummy", skip_tokenizer_init=True,
                  max_model_len=131072, gpu_memory_utilization=0.6, seed=0)
    _, ref_log = generate_in_subprocess({**common, "attention_backend": "FLASH_ATTN"}, prompts[1:], 4)
    got, log = generate_in_subprocess(
        {**common, "attention_backend": "XATTN",
         "additional_config": {"xattn": {"selection": "ratio", "ratio": 0.1}}}, prompts, 4)
    assert "XATTN sparse prefill running" in log
    assert [len(t) for t in got] == [4, 4]
    ref_tokens, tokens = _kv_cache_tokens(ref_log), _kv_cache_tokens(log)
    print(f"KV cache tokens: FLASH_ATTN {ref_tokens}, XATTN {tokens}")
    assert tokens >= 0.97 * ref_tokens
