"""Helpers for the end-to-end GPU tests: a Llama-shaped model with dummy weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from serve_util import ENV  # noqa: E402


def write_llama_config(path: Path, **overrides) -> Path:
    """A small Llama (GQA 4, head_dim 128) whose weights vLLM fills with dummies."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
        "vocab_size": 32000, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def save_log(name: str, text: str) -> None:
    """Keep engine logs for inspection when XATTN_TEST_LOGS names a folder."""
    folder = os.environ.get("XATTN_TEST_LOGS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.log").write_text(text)


GENERATE = r"""
import json, sys
import vllm_xattn  # noqa: F401
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
spec = json.loads(open(sys.argv[1]).read())
llm = LLM(**spec["llm"])
params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                        logprobs=spec["top_logprobs"] or None)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params)
print("TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
if spec["top_logprobs"]:  # per prompt, per generated token: [[token, logprob], ...] best first
    print("TOP=" + json.dumps([[sorted(([t, lp.logprob] for t, lp in pos.items()), key=lambda x: -x[1])
                                for pos in o.outputs[0].logprobs] for o in outs]))
import os
if os.environ.get("XATTN_DENSITY_LOG"):  # two more steps write the last step's density records
    for _ in range(2):
        llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=1))
"""


@dataclass
class Generation:
    tokens: list[list[int]]  # greedy token ids per prompt
    log: str  # the engine's stdout + stderr
    top: list | None = None  # with top_logprobs: per prompt and token, [[token, logprob], ...]


def generate(llm_kwargs: dict, prompts: list[list[int]], max_tokens: int, *, timeout: int = 900,
             env: dict | None = None, top_logprobs: int = 0) -> Generation:
    """Greedy generation in a fresh process (one engine per process). ``env``: extra
    environment variables (they reach the engine's worker processes too); ``top_logprobs``:
    also return that many top logprobs per generated token."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"llm": llm_kwargs, "prompts": prompts, "max_tokens": max_tokens,
                   "top_logprobs": top_logprobs}, f)
    out = subprocess.run([sys.executable, "-c", GENERATE, f.name], capture_output=True,
                         text=True, timeout=timeout, env={**ENV, **(env or {})})
    os.unlink(f.name)
    log = out.stdout + out.stderr
    save_log(f"generate-{llm_kwargs.get('attention_backend', 'auto')}", log)
    assert out.returncode == 0, log[-6000:]

    def last(prefix):
        lines = [l for l in out.stdout.splitlines() if l.startswith(prefix)]
        return json.loads(lines[-1][len(prefix):]) if lines else None

    return Generation(last("TOKENS="), log, last("TOP="))


def generate_in_subprocess(llm_kwargs: dict, prompts: list[list[int]], max_tokens: int,
                           timeout: int = 900, env: dict | None = None) -> tuple[list[list[int]], str]:
    """(greedy token ids, engine log) of ``generate``."""
    g = generate(llm_kwargs, prompts, max_tokens, timeout=timeout, env=env)
    return g.tokens, g.log


def token_mismatches(got: list[list[int]], ref: Generation, prompts: list[list[int]], *,
                     tie_margin: float | None = None) -> str:
    """'' if every prompt's tokens equal the reference's; else, per differing prompt, its
    length, the first differing position and, with the reference's top logprobs, the
    reference's margin there (top-1 minus top-2 logprob: near 0 means a near-tie).

    ``tie_margin``: also '' if every differing prompt first differs where the reference's
    top-2 margin is at most this (a near-tie, which FLASH_ATTN itself resolves either way when
    only the batch changes: ``NEAR_TIE_MARGIN``) and the got token is the reference's second."""
    diffs, ties = [], 0
    for i, (a, b) in enumerate(zip(got, ref.tokens)):
        if a == b:
            continue
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        msg = f"prompt {i} ({len(prompts[i])} tokens): first difference at generated token {k}"
        if ref.top is not None and k < len(ref.top[i]) and len(ref.top[i][k]) > 1:
            (t1, lp1), (t2, lp2) = ref.top[i][k][:2]
            msg += f", reference margin {lp1 - lp2:.4f} (top-2 tokens {t1}, {t2}; got {a[k]})"
            ties += tie_margin is not None and k < len(a) and a[k] == t2 and lp1 - lp2 <= tie_margin + 1e-6
        diffs.append(msg)
    if len(diffs) == ties:
        return ""
    return f"{len(got) - len(diffs)}/{len(got)} identical; " + "; ".join(diffs)


# The largest top-2 logprob margin at which FLASH_ATTN's own greedy token changed when only the
# batch order changed (22 real-model prompts, Qwen2.5-Coder-0.5B bf16 on the H100: 6 prompts
# flipped at margins 0-0.125, one bf16 step of a logit in [16, 32);
# benchmarks/results/batch_invariance_bd2eb8a_h100.json).
NEAR_TIE_MARGIN = 0.125
