"""The streaming parser (multiverse/format/parser.py) against the list-based one it replaced
(tests/_reference_parser.py): the same tree and the same issues, in order, with the same lines
and columns, on random documents, valid, mutated and pure tag soup; and the memory it keeps."""

from __future__ import annotations

import random
import tracemalloc

import _reference_parser as reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multiverse.format import grammar as g
from multiverse.format.document import TAGS

CASES = [lambda t: t, str.lower, str.upper, lambda t: t[:2] + t[2:].swapcase()]
TEXTS = ["", "\n", " ", "  \n\t", "x", "1: ", "2: ", "1.2: ", "a b\nc", "\nLet's think in parallel.\n",
         "é中", "\r\n", "3 + 4 = 7.", "<", ">", "</", "<Pat>", "Answer: 5"]  # fmt: skip


def valid_doc(rng: random.Random) -> str:
    """A well-formed document with nested blocks (labels sometimes missing or repeated)."""

    def prose() -> str:
        return rng.choice(["we count", "1 + 2 = 3", "a\nb", "", "x y z"]) + "\n"

    def block(depth: int, prefix: str) -> str:
        k = rng.randint(1, 3)
        labels = [rng.choice([f"{prefix}{i + 1}", f"{i + 1}", "", "1"]) for i in range(k)]
        out = ["<Parallel>\n<Goal>\n"]
        out += [f"<Outline>\n{lab + ': ' if lab else ''}{prose()}</Outline>\n" for lab in labels]
        out.append("</Goal>\n")
        for lab in labels:
            out.append(f"<Path>\n{lab + ': ' if lab else ''}{prose()}")
            if depth < 3 and rng.random() < 0.4:
                out += [block(depth + 1, (lab or "1") + "."), "\n"]
            out.append("</Path>\n")
        out.append(f"<Conclusion>\n{prose()}</Conclusion>\n</Parallel>")
        return "".join(out)

    parts = [rng.choice(["", "pre\n"]), "<Think>\n"]
    for _ in range(rng.randint(0, 3)):
        parts += [prose(), block(1, ""), "\n"]
    parts += ["</Think>\n", rng.choice(["Answer: 4", "", "x <Path> y"])]
    return "".join(parts)


def mutate(text: str, rng: random.Random) -> str:
    """Break a document: cut it, drop/repeat/recase a tag, insert a tag or text anywhere."""
    for _ in range(rng.randint(1, 4)):
        i = rng.randint(0, len(text))
        op = rng.randrange(6)
        if op == 0:
            text = text[:i]
        elif op in (1, 2, 3):
            starts = [k for k, c in enumerate(text) if c == "<"]
            if not starts:
                continue
            k = rng.choice(starts)
            end = text.find(">", k) + 1 or len(text)
            tag = text[k:end]
            text = text[:k] + ("" if op == 1 else tag * 2 if op == 2 else rng.choice(CASES)(tag)) + text[end:]
        elif op == 4:
            text = text[:i] + rng.choice(CASES)(rng.choice(TAGS)) + text[i:]
        else:
            text = text[:i] + rng.choice(TEXTS) + text[i:]
    return text


def assert_same(text: str) -> None:
    doc, issues = g.read(text)
    ref_doc, ref_issues = reference.read(text)
    assert issues == ref_issues, text
    assert doc == ref_doc, text


def test_valid_and_mutated_documents_parse_as_before():
    rng = random.Random(0)
    for _ in range(1500):
        text = valid_doc(rng)
        assert_same(text)
        assert_same(mutate(text, rng))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(TEXTS), st.text(max_size=6),
                          st.builds(lambda t, c: c(t), st.sampled_from(TAGS), st.sampled_from(CASES))),
                max_size=60))  # fmt: skip
def test_tag_soup_parses_as_before(pieces):
    assert_same("".join(pieces))


def test_read_keeps_only_the_tree():
    """Peak memory while reading is a small multiple of the text (the old parser kept a token
    object per tag and per text run and a line index: about 35x the text here)."""
    rng = random.Random(1)
    text = "".join(valid_doc(rng) for _ in range(60)).replace("</Think>", "") * 5
    tracemalloc.start()
    try:
        g.read(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * len(text), (peak, len(text))
