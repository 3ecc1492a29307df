"""The byte-class counts of the built-in tokenizer (multiverse/format/approx.py) against the
reference (``grammar.approx_tokens``), and ``inspect``'s layout extent from runs against the
per-token layout; ``inspect_text`` never makes a string per token."""

from __future__ import annotations

import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from multiverse.eval import structure
from multiverse.format import approx
from multiverse.format import grammar as g
from multiverse.format.layout import layout_tags

# every class of character the counter tells apart, the exotic ones (reference path) included
PIECES = list("abXZ09 \t\n\r\x0b\x0c\x1c\x1f.,:<>/\x00\x7f") + [
    "<Path>", "</path>", "<THINK>", "</Parallel>", "<Goal>", "</Conclusion>", "<outline>",
    "é", "中", "\u0663", "\ud800", "😀", "\x85", "\xa0", "\u3000", "\u2028", "ſ", "\u212a", "\u0130", "<thin\u212a>",
]  # fmt: skip


def test_the_exotic_characters_are_all_the_ones_the_classes_miss():
    """Every non-ASCII character that is white space or that [A-Za-z] takes under IGNORECASE
    (what the byte classes cannot see) sends the text to the reference, and no other does."""
    letters = re.compile(r"[A-Za-z]", re.IGNORECASE)
    missed = {chr(c) for c in range(128, 0x110000) if chr(c).isspace() or letters.fullmatch(chr(c))}
    assert missed == {chr(c) for c in range(128, 0x110000) if approx._EXOTIC_RE.fullmatch(chr(c))}


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)), max_size=40))
def test_counts_and_runs_equal_the_reference(pieces):
    text = "".join(pieces)
    ref = g.approx_tokens(text)
    want = list(approx.group(t if t in g.TAGS else None for t in ref))
    for piece in (1, 3, 8, approx.PIECE):  # the text encoded this many characters at a time
        assert approx.count(text, piece) == len(ref)
        assert list(approx.runs(text, piece)) == want


def test_layout_extent_equals_the_per_token_layout():
    rng = random.Random(0)
    for _ in range(300):
        tags = [rng.choice([None] * 8 + list(g.TAGS)) for _ in range(rng.randint(0, 80))]
        lay = layout_tags(tags)
        assert structure.layout_extent(approx.group(tags)) == (len(lay), lay.depth_tokens(0))


def test_inspect_makes_no_string_per_token(monkeypatch):
    """The report's counts come from runs: the per-token reference is never called (the old
    ``inspect_text`` listed every token twice, and laid them out one Python tuple each)."""
    text = "<Think>\nword 12\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n</Goal>\n<Path>\n1: b c\n</Path>\n" \
           "<Conclusion>\nd\n</Conclusion>\n</Parallel>\n</Think>\nAnswer: 4"  # fmt: skip
    want = layout_tags(structure.TokenCounter().tags(text))
    monkeypatch.setattr(g, "approx_tokens", None)
    monkeypatch.setattr(approx, "approx_tokens", None)
    rep = structure.inspect_text(text)
    d = rep.to_dict()
    assert (d["total_tokens"], d["depth_tokens"]) == (len(want), want.depth_tokens(0))
    assert structure.format_report(rep, structure.TokenCounter())
