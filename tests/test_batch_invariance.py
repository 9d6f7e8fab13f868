"""scripts/batch_invariance.py on the CPU with a fake engine: the reversed-order run is mapped
back to the prompts' order before it is compared, and every run's verdict lands in the JSON."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import batch_invariance as bi  # noqa: E402
from tests.e2e_util import Generation  # noqa: E402


def test_runs_are_compared_in_the_prompts_order(monkeypatch, tmp_path):
    prompts = [[1] * 5, [2] * 7, [3] * 9]

    def fake_generate(kw, ps, max_tokens, top_logprobs=0):
        # each prompt's tokens derive from the prompt itself, so order must not matter;
        # XATTN changes prompt 1's first token to the reference's runner-up
        toks = [[p[0], p[0] + 10] for p in ps]
        top = [[[[p[0], -0.1], [99, -0.15]], [[p[0] + 10, -0.1], [98, -0.9]]] for p in ps]
        if kw["attention_backend"] == "XATTN":
            toks = [[99, 0] if p[0] == 2 else t for p, t in zip(ps, toks)]
        return Generation(toks, "", top)

    monkeypatch.setattr(bi, "generate", fake_generate)
    monkeypatch.setattr(bi, "real_prompts", lambda: prompts)
    monkeypatch.setattr(bi.torch.cuda, "get_device_name", lambda *a: "fake")
    out = tmp_path / "bi.json"
    monkeypatch.setattr(sys, "argv", ["batch_invariance.py", "--out", str(out)])
    bi.main()
    res = json.loads(out.read_text())["results"]
    assert res["FLASH_ATTN, prompts in reverse order"] == "3/3 identical"
    assert res["FLASH_ATTN, 16384-token steps"] == "3/3 identical"
    assert res["XATTN threshold 1.0"].startswith("2/3 identical; prompt 1 (7 tokens): first difference at generated token 0")
