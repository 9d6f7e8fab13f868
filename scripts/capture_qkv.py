"""Capture every layer's Q, K, V of one long prefill of a real model, as XATTN sees them.

    python scripts/capture_qkv.py --model /tmp/qwen05 --text essays.txt --tokens 32768 --out /tmp/cap

Runs vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with the XATTN backend at threshold
1.0 (dense-equivalent, so later layers see exact inputs) and the whole prompt in one chunk,
and saves ``layer_XX.pt`` = {q [T, Hq, D], k, v [N, Hkv, D]} (bf16) read back from the
paged cache. ``scripts/analyze_captured.py`` scores them.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine and its model in this process

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--offset", type=int, default=0, help="first token of the text window")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import vllm_xattn  # noqa: F401
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_xattn.backends.xattn import XAttentionImpl
    from vllm_xattn.kernels import split_kv

    done: set[str] = set()
    original = XAttentionImpl.forward

    def capturing_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *a, **kw):
        result = original(self, layer, query, key, value, kv_cache, attn_metadata, output, *a, **kw)
        step = getattr(attn_metadata, "sparse", None)
        if step is not None and step.plan.num_requests == 1 and layer.layer_name not in done:
            done.add(layer.layer_name)
            n = step.tok_end - step.tok_start  # one chunk: the whole sequence
            ps = kv_cache.shape[2]
            pages = step.block_table[0, : -(-n // ps)].long()
            k_view, v_view = split_kv(kv_cache)  # (pages, Hkv, page, D)
            gather = lambda c: c[pages].permute(0, 2, 1, 3).reshape(-1, c.shape[1], c.shape[3])[:n]
            torch.save({"q": query[step.tok_start:step.tok_end].clone().cpu(),
                        "k": gather(k_view).cpu(), "v": gather(v_view).cpu(),
                        "layer": layer.layer_name},
                       out / f"layer_{len(done) - 1:02d}.pt")
        return result

    XAttentionImpl.forward = capturing_forward
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(open(args.text).read())["input_ids"][args.offset: args.offset + args.tokens]
    llm = LLM(model=args.model, attention_backend="XATTN", enforce_eager=True,
              max_model_len=args.tokens + 64, max_num_batched_tokens=args.tokens + 64,
              gpu_memory_utilization=0.5,
              additional_config={"xattn": {"threshold": 1.0, "min_sparse_tokens": 1024}})
    llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1))
    print(f"captured {len(done)} layers of {len(ids)} tokens into {out}")


if __name__ == "__main__":
    main()
