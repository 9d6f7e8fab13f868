"""Start and stop a local `vllm serve` for scripts and GPU tests (loopback only)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ENV = {
    **os.environ,
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # avoids a ~2 min JIT build per engine start
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
}


def backend_args(knobs: dict | None) -> list[str]:
    """`vllm serve` arguments for FLASH_ATTN (``knobs`` None) or XATTN with these xattn knobs."""
    if knobs is None:
        return ["--attention-backend", "FLASH_ATTN"]
    return ["--attention-backend", "XATTN", "--additional-config", json.dumps({"xattn": knobs})]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: str, args: list[str], log_path: Path, timeout: float = 600,
                env: dict | None = None):
    """Yields the base URL once /health answers; the server is stopped on exit. ``env``:
    extra environment variables for the server."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
           "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**ENV, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()[-6000:]}")
            if time.time() > deadline:
                raise TimeoutError("server did not come up")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(url: str, path: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def measured_density(url: str, model: str, log_dir: Path, before: dict) -> tuple[float | None, dict]:
    """Density the server's sparse layers ran at since ``before`` (``read_density`` totals of
    its XATTN_DENSITY_LOG directory). Two one-token requests first make the server build two
    more steps: the first starts copying the last step's records to the host, the second
    writes them (density_log.DensityLog.flush)."""
    from vllm_xattn.backends.density_log import read_density

    for _ in range(2):
        post(url, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1})
    now = read_density(log_dir)
    sel, cand = now["selected"] - before["selected"], now["candidates"] - before["candidates"]
    return (sel / cand if cand else None), now
