"""Long-context probes built from a haystack text: needle retrieval and multi-key retrieval.

Pure functions (no server, no GPU) so that prompt construction and answer scoring are
unit-tested on CPU (tests/test_longctx_tasks.py); scripts/eval_longctx.py sends the prompts
to a vLLM OpenAI-compatible server.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

# Facts that appear nowhere in the essays; the answer is the number.
NEEDLES = [
    ("Alice", "The special magic number for Alice is {value}."),
    ("the lighthouse keeper", "The secret code of the lighthouse keeper is {value}."),
    ("project Juniper", "The launch key of project Juniper is {value}."),
]
QUESTION = "What is the {kind} of {key}? Answer with the number only."
KINDS = {0: "special magic number", 1: "secret code", 2: "launch key"}


@dataclass(frozen=True)
class Probe:
    text: str  # haystack with the needle(s) in it, then the question (one user message)
    answer: str
    length: int  # haystack tokens
    depth: float  # where the asked needle sits, 0 = start, 1 = end
    needle: int  # index into NEEDLES of the asked needle
    keys: int  # needles inserted (1 = single needle, > 1 = multi-key)


def insert_at(haystack: str, needle: str, depth: float, max_back: int = 2000) -> str:
    """Insert ``needle`` at ``depth`` (0..1) of the haystack, moved back to the previous
    sentence end (within ``max_back`` characters) so that it does not split a sentence."""
    pos = int(round(depth * len(haystack)))
    cut = haystack.rfind(". ", max(0, pos - max_back), pos)
    if 0 < pos < len(haystack) and cut >= 0:
        pos = cut + 2
    return haystack[:pos] + needle + " " + haystack[pos:]


def question(n: int) -> str:
    return QUESTION.format(kind=KINDS[n], key=NEEDLES[n][0])


def build_probes(tokenizer, haystack_text: str, *, lengths: list[int], depths: list[float],
                 needles: list[int], multi_keys: int = 0, seed: int = 0) -> list[Probe]:
    """Single-needle probes for every (length, depth, needle); with ``multi_keys`` > 1, also
    probes with that many needles of different kinds (others at random depths), asking one.
    The haystack is the first ``length`` tokens of the text."""
    rng = random.Random(seed)
    ids = tokenizer.encode(haystack_text, add_special_tokens=False)
    probes = []
    for length in lengths:
        if length > len(ids):
            raise ValueError(f"haystack has {len(ids)} tokens, fewer than {length}")
        hay = tokenizer.decode(ids[:length])
        for n in needles:
            for depth in depths:
                value = str(rng.randrange(1000, 10000))
                body = insert_at(hay, NEEDLES[n][1].format(value=value), depth)
                probes.append(Probe(body + "\n\n" + question(n), value, length, depth, n, 1))
        if multi_keys > 1:
            for depth in depths:
                kinds = rng.sample(range(len(NEEDLES)), k=min(multi_keys, len(NEEDLES)))
                body, asked, value = hay, kinds[0], ""
                for k in kinds:
                    v = str(rng.randrange(1000, 10000))
                    body = insert_at(body, NEEDLES[k][1].format(value=v),
                                     depth if k == asked else rng.random())
                    value = v if k == asked else value
                probes.append(Probe(body + "\n\n" + question(asked), value, length, depth,
                                    asked, len(kinds)))
    return probes


def is_correct(answer_text: str, expected: str) -> bool:
    """The first number in the reply must be the expected one."""
    m = re.search(r"\d+", answer_text)
    return m is not None and m.group(0) == expected
