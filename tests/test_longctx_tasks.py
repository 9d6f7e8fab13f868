"""Prompt construction and answer scoring of the long-context probes (CPU)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from longctx_tasks import NEEDLES, build_probes, insert_at, is_correct  # noqa: E402


class WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word."""

    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


TEXT = " ".join(f"Sentence number {i} talks about essays and startups." for i in range(400))


def test_insert_at_sentence_boundary():
    out = insert_at(TEXT, "NEEDLE.", 0.5)
    i = out.index("NEEDLE.")
    assert out[i - 2 : i] == ". "  # right after a sentence end
    assert abs(i / len(TEXT) - 0.5) < 0.02
    assert insert_at(TEXT, "NEEDLE.", 0.0).startswith("NEEDLE.")
    assert insert_at(TEXT, "NEEDLE.", 1.0).rstrip().endswith("NEEDLE.")


def test_single_needle_probes():
    tok = WordTokenizer()
    depths = [i / 9 for i in range(10)]
    probes = build_probes(tok, TEXT, lengths=[500, 1000], depths=depths, needles=[0, 1, 2])
    assert len(probes) == 2 * 10 * 3
    for p in probes:
        key, template = NEEDLES[p.needle]
        assert template.format(value=p.answer) in p.text
        assert p.text.rstrip().endswith("Answer with the number only.")
        assert key in p.text.splitlines()[-1]
        assert abs(len(p.text.split()) - p.length) < 40  # haystack + needle + question
    assert len({p.answer for p in probes}) > 30  # values vary


def test_multi_key_probes_ask_one_of_several():
    tok = WordTokenizer()
    probes = build_probes(tok, TEXT, lengths=[800], depths=[0.1, 0.5, 0.9], needles=[],
                          multi_keys=3)
    assert len(probes) == 3
    for p in probes:
        assert p.keys == 3
        assert sum(t.split("{")[0] in p.text for _, t in NEEDLES) == 3
        assert NEEDLES[p.needle][1].format(value=p.answer) in p.text


def test_too_short_haystack():
    with pytest.raises(ValueError, match="fewer than"):
        build_probes(WordTokenizer(), "a b c", lengths=[10], depths=[0.5], needles=[0])


@pytest.mark.parametrize("reply, ok", [("4821", True), (" The number is 4821.", True),
                                       ("48210", False), ("I don't know", False),
                                       ("1234 or 4821", False)])
def test_scoring(reply, ok):
    assert is_correct(reply, "4821") == ok
