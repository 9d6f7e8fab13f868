"""Shared pieces of the GPU benchmarks: layer shapes, paged inputs, dense FA3, records."""
from __future__ import annotations

import json
import math
import os
import subprocess
from datetime import date
from pathlib import Path

import torch

# Attention-layer shapes named as in the issue records.
SHAPES = {
    "llama-3.1-8b": dict(num_q_heads=32, num_kv_heads=8, head_dim=128),
    "qwen2.5-0.5b": dict(num_q_heads=14, num_kv_heads=2, head_dim=64),
}


def commit() -> str:
    """The checkout's commit; XATTN_COMMIT when the checkout has no .git (the GPU copy)."""
    if os.environ.get("XATTN_COMMIT"):
        return os.environ["XATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def paged_inputs(seq_lens, query_lens, *, num_q_heads, num_kv_heads, head_dim, page_size=16,
                 dtype=torch.bfloat16, device="cuda", seed=0):
    """Random q and a vLLM-layout paged KV cache (physically NHD, pages shuffled).

    Returns q [T, Hq, D], kv_cache (logical (P, Hkv, page, 2D) view), block_table [R, max_pages],
    cu_seqlens_q [R+1] (CPU int32) and seq_lens [R] (CPU int32).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    pages_per_req = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(pages_per_req) + 7
    perm = torch.randperm(num_pages, generator=g, device=device).to(torch.int32)
    phys = torch.randn(num_pages, page_size, num_kv_heads, 2 * head_dim, generator=g,
                       device=device, dtype=torch.float32).to(dtype)
    kv_cache = phys.permute(0, 2, 1, 3)
    max_pages = max(pages_per_req)
    block_table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32, device=device)
    start = 0
    for r, np_ in enumerate(pages_per_req):
        block_table[r, :np_] = perm[start:start + np_]
        start += np_
    T = sum(query_lens)
    q = torch.randn(T, num_q_heads, head_dim, generator=g, device=device,
                    dtype=torch.float32).to(dtype)
    cu_q = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)
    return q, kv_cache, block_table, cu_q, torch.tensor(seq_lens, dtype=torch.int32)


def shape_name(num_q_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """The ``SHAPES`` name of a layer shape, or "HqxHkvxD" for another one."""
    dims = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return next((k for k, v in SHAPES.items() if v == dims), f"{num_q_heads}x{num_kv_heads}x{head_dim}")


def captured_layers(folder, layer_step: int = 1, *, page_size: int = 16, device="cuda"):
    """Every ``layer_step``-th layer of a ``scripts/capture_qkv.py`` folder as one request of
    whole 128-token blocks: yields (file name, q, kv_cache, block_table, cu_seqlens_q,
    seq_lens) like ``paged_inputs`` (pages shuffled, physically NHD)."""
    from vllm_xattn.kernels import make_paged_cache

    for path in sorted(Path(folder).glob("layer_*.pt"))[::layer_step]:
        cap = torch.load(path)
        n = cap["q"].shape[0] // 128 * 128
        q, k, v = (cap[x][:n].to(device) for x in ("q", "k", "v"))
        cu = torch.tensor([0, n], dtype=torch.int32)
        kv, bt = make_paged_cache(k, v, cu, page_size, generator=torch.Generator().manual_seed(0))
        yield path.name, q, kv, bt.to(device), cu, torch.tensor([n], dtype=torch.int32)


def contiguous_kv(kv_cache, block_table, seq_lens):
    """Gather the paged cache back into contiguous K, V [N_total, Hkv, D] (for references)."""
    d = kv_cache.shape[-1] // 2
    ps = kv_cache.shape[2]
    ks, vs = [], []
    for r, n in enumerate(seq_lens.tolist()):
        pages = block_table[r, : math.ceil(n / ps)].long()
        kv = kv_cache[pages].permute(0, 2, 1, 3).reshape(-1, kv_cache.shape[1], 2 * d)[:n]
        ks.append(kv[..., :d])
        vs.append(kv[..., d:])
    return torch.cat(ks), torch.cat(vs)


def step_keys(kv_cache, block_table, cu_q, seq_lens, num_q_heads):
    """The keys of the queries' own tokens as an attention layer receives them: a [T, Hkv, D] view
    into a fused q / k / v projection output (token stride (Hq + 2 Hkv) * D), whose q and v
    columns are NaN: a reader that strays outside the keys yields NaN scores."""
    k, _ = contiguous_kv(kv_cache, block_table, seq_lens)
    cu_k = [0] + seq_lens.cumsum(0).tolist()
    cq = cu_q.tolist()
    hkv, d = k.shape[1], k.shape[2]
    qkv = torch.full((cq[-1], num_q_heads + 2 * hkv, d), float("nan"), dtype=k.dtype, device=k.device)
    for r in range(len(cq) - 1):
        qkv[cq[r]:cq[r + 1], num_q_heads:num_q_heads + hkv] = k[cu_k[r + 1] - (cq[r + 1] - cq[r]):cu_k[r + 1]]
    return qkv[:, num_q_heads:num_q_heads + hkv]


def dense_fa3(q, kv_cache, block_table, cu_q, seq_lens, out=None):
    """vLLM's FA3 varlen over the paged cache, causal (the stock FLASH_ATTN prefill)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    d = q.shape[-1]
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
    dev = q.device
    cu = cu_q.to(dev)
    sl = seq_lens.to(dev)
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int(seq_lens.max())

    def run():
        return flash_attn_varlen_func(
            q=q, k=key_cache, v=value_cache, cu_seqlens_q=cu, max_seqlen_q=max_q,
            seqused_k=sl, max_seqlen_k=max_k, softmax_scale=d ** -0.5, causal=True,
            block_table=block_table, fa_version=3, out=out,
        )

    return run


def time_interleaved(fns: dict, *, rounds: int = 5, rep: int = 25, bench=None) -> dict[str, list[float]]:
    """Per name, the ``do_bench`` median (ms) of ``fns[name]`` in each of ``rounds`` rounds.
    Every round times all functions, in an order rotated by one each round, so clock and
    thermal drift over the run lands on all of them alike: compare medians, or ratios taken
    within a round (a single ``do_bench`` per case moved shares by up to 0.15 between runs)."""
    if bench is None:
        from triton.testing import do_bench
        bench = lambda fn: do_bench(fn, warmup=2, rep=rep)  # noqa: E731
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(float(bench(fns[k])))
    return times


def causal_flops(query_lens, seq_lens, num_q_heads, head_dim) -> float:
    """FLOPs of exact causal attention (QK^T and PV) for queries at the end of each sequence."""
    total = 0.0
    for tq, n in zip(query_lens, seq_lens):
        ctx = n - tq
        pairs = tq * ctx + tq * (tq + 1) / 2
        total += 4.0 * pairs * head_dim * num_q_heads
    return total


def write_records(path: Path, records: list[dict], command: str, **extra) -> None:
    """The results file: date, device, commit, command, ``extra`` top-level fields, records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": str(date.today()), "device": device_name(),
                                "commit": commit(), "command": command, **extra,
                                "records": records}, indent=1))


def merge_records(path: Path, records: list[dict], key: tuple[str, ...]) -> None:
    """Put ``records`` into the results file at ``path``: a record there with the same ``key``
    fields is replaced, the others and the file's top-level fields are kept. Each record must
    carry its own commit, date and command, since the file's may belong to another run."""
    results = json.loads(path.read_text()) if path.exists() else {"records": []}
    ident = lambda r: json.dumps([r.get(k) for k in key])  # values may be lists
    new = {ident(r) for r in records}
    results["records"] = [r for r in results["records"] if ident(r) not in new] + records
    path.write_text(json.dumps(results, indent=1))


def line_plot(path: Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str,
              ylabel: str, hlines: tuple[float, ...] = (), log2_x: bool = True) -> None:
    """One PNG of labelled (x, y) series beside a results file (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series.items():
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", ms=3, label=label)
    for y in hlines:
        ax.axhline(y, ls="--", c="gray", lw=0.8)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
