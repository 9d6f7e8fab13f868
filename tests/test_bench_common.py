"""bench_common: time_interleaved rotates the order each round; layer shapes by name; captured layers."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_common import time_interleaved  # noqa: E402


def test_time_interleaved_rotates_and_collects_every_round():
    calls = []

    def bench(fn):
        calls.append(fn())
        return float(len(calls))

    fns = {"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}
    times = time_interleaved(fns, rounds=4, bench=bench)
    assert calls == list("abc" "bca" "cab" "abc")
    assert times == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}


def test_shape_name():
    from bench_common import shape_name

    assert shape_name(32, 8, 128) == "llama-3.1-8b" and shape_name(14, 2, 64) == "qwen2.5-0.5b"
    assert shape_name(16, 4, 64) == "16x4x64"


def test_captured_layers_are_one_request_of_whole_blocks(tmp_path):
    import torch

    from bench_common import captured_layers, contiguous_kv

    g = torch.Generator().manual_seed(0)
    for layer in range(5):
        torch.save({x: torch.randn(300, h, 16, generator=g) for x, h in (("q", 4), ("k", 2), ("v", 2))},
                   tmp_path / f"layer_{layer:02d}.pt")
    got = list(captured_layers(tmp_path, 2, page_size=16, device="cpu"))
    assert [name for name, *_ in got] == ["layer_00.pt", "layer_02.pt", "layer_04.pt"]
    name, q, kv, bt, cu, sl = got[1]
    want = torch.load(tmp_path / name)
    assert q.shape == (256, 4, 16) and torch.equal(q, want["q"][:256])  # 2 whole blocks of 128
    assert cu.tolist() == [0, 256] and sl.tolist() == [256]
    k, v = contiguous_kv(kv, bt, sl)
    assert torch.equal(k, want["k"][:256]) and torch.equal(v, want["v"][:256])
