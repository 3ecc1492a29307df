"""units: normalisation and the numbered units (property: joining the units is exact)."""

import itertools
import random

from multiverse.curate import units as U
from multiverse.eval import tasks
from multiverse.format import grammar


def _random_chain(rng: random.Random) -> str:
    words = ["x", "the", "sum", "is", "3.", "Then", "y!", "$a.b$", "ok?", "  ", "\t"]
    lines = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.1:
            lines += ["$$", "a + b", "$$"]
        elif kind < 0.2:
            lines += ["```python", "  x = 1. y = 2.", "```"]
        elif kind < 0.25:
            lines += ["\\[ x \\]", "Let's think in parallel."]
        elif kind < 0.3:
            lines.append("```x = 1;```")
        else:
            n = rng.choice([3, 10, 120])
            lines.append(" ".join(rng.choice(words) for _ in range(n)))
        if rng.random() < 0.2:
            lines.append("")
    return "<Think>\n" + "\n".join(lines) + "\n</Think>"


def test_join_of_units_is_the_normalised_chain_property():
    rng = random.Random(0)
    for _ in range(300):
        chain = _random_chain(rng)
        norm = U.normalise(chain)
        for max_chars in (20, 300):
            units = U.split_units(norm, max_chars=max_chars)
            assert U.join(units) == norm
            assert [u.index for u in units] == list(range(1, len(units) + 1))
            assert all(u.text.strip() for u in units)


def test_math_and_code_blocks_are_one_unit_and_long_lines_become_sentences():
    text = "A. " * 200 + "\n$$\nx = 1. y = 2.\n$$\n```\n  code. more.\n```\n\\[\nz\n\\]\nend"
    units = U.split_units(U.normalise(text))
    assert units[0].text == "A." and units[1].sep == " "
    assert [u.text for u in units[-4:]] == ["$$\nx = 1. y = 2.\n$$", "```\n  code. more.\n```", "\\[\nz\n\\]", "end"]


def test_a_fence_opened_and_closed_on_one_line_is_one_line():
    text = "a\n  ```real adc = 100;```  \n  b  \n\n```\nc\n```\nd"
    norm = U.normalise(text)
    assert norm == "a\n```real adc = 100;```\nb\n```\nc\n```\nd"  # b stripped: no fence was open
    assert [u.text for u in U.split_units(norm)] == ["a", "```real adc = 100;```", "b", "```\nc\n```", "d"]


def test_inline_math_is_not_cut():
    line = "We have $a. B$ here. " * 30
    units = U.split_units(line.strip(), max_chars=50)
    assert all(u.text.count("$") % 2 == 0 for u in units)


def test_normalise_flattens_multiverse_text_and_drops_cue_lines():
    for r in itertools.islice(tasks.iter_records(0, "train"), 20):
        assert U.normalise(r.chain) == grammar.flatten(r.sequential_chain)
        assert U.normalise(r.sequential_chain) == grammar.flatten(r.sequential_chain)
