"""Natural-language word problems in two kinds: ``word_parallel`` and ``word_sequential``.

``word_parallel``: a bakery, farm, school, library, garden or toy shop has 4 named quantities,
one line each in the question (``Rolls: 4 trays of 5, doubles them, then sells 10.``), each
computed by its own chain of three steps; the question asks for all of them together (how many
in all). One block: short outlines (the quantity's name); each path restates its line, then
computes one step a line, led by the words it computes (``4 trays of 5: 4 * 5 = 20.``,
``Doubles them: 20 * 2 = 40.``, ``Sells 10: 40 - 10 = 30.``), then ``Rolls = 30.``; the
conclusion lists the four counts (``Rolls = 30, Buns = 50, ...``); the Reduce adds them one at
a time (``30 + 50 = 80.`` ...) and ends ``In all: 140.``

``word_sequential``: one person's quantity goes through 4-6 dependent steps (each needs the
result before it), one line a step in the same form; rendered without a block, so the
Multiverse chain and the sequential chain are the same plain ``<Think>`` text (forking would be
wrong here).

The arithmetic is what a 135M model can get right after a short LoRA fine-tune: a product from
the times table (2-9 by 2-12), doubling, halving of even numbers, adding or taking away whole
tens (10-50). Each changes digits by a small fixed rule. General addition and subtraction (``36
- 17``, ``79 + 119``) are left out: SmolLM2-135M-Instruct got 9 of 60 two-digit sums and
differences right before fine-tuning, and the adapter trained on 1,000 problems of the first
version of these tasks (with additions and subtractions of 1-20) still got 87 of 322 of them
wrong on 80 held-out problems (1 of 292 products and halvings). So each quantity of a
``word_parallel`` problem ends at a whole ten from 10 to 50, and the Reduce's additions are the
paths' own kind of step.

Why a total, not the largest or the smallest count (the Reduce of earlier versions): picking
the larger of two counts is what SmolLM2-135M did not learn from a few hundred problems. Trained
with the same LoRA recipe on comparison lines alone (``Larger of Rolls 32 and Buns 140: Buns
140.``), it picked the right count in 46.5% / 50.0% / 51.5% / 78.5% of 200 held-out pairs after
256 / 512 / 1,008 / 2,000 examples; 500 word problems hold about 780 comparisons, and the
adapters trained on them got 47-51 of 102 comparisons wrong while their paths were right.
Every intermediate result is in 1..199.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from multiverse.eval.task_plans import Plan, PlanBlock

LIMIT = 200
"""Every intermediate result is below this (and above 0)."""
MAX_QUESTION_SIZE = 100
"""A ``word_parallel`` question of at most this :func:`_size` has at most ~110 SmolLM2 tokens (85-109 on 1,000 test problems)."""
QUANTITIES = 4
"""Quantities of a ``word_parallel`` problem. Four, not three: on a CPU a batch of 3 decode rows
costs as much as a batch of 4 (``benchmarks/fork_speed.py``, SmolLM2: 10.6 s for both), so a
fourth path is nearly free, and it lifts # parallel past 1.8."""
PATH_STEPS = 2
"""Steps after the product in each ``word_parallel`` path (three equations a path)."""
COUNTS = (10, 20, 30, 40, 50)
"""What each quantity of a ``word_parallel`` problem ends at: whole tens, so that adding them up
(the Reduce) is adding 10-50, a step the paths use too."""

# theme: (place, container, items, take-away verb, add verb)
THEMES: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    ("A bakery", "trays", ("rolls", "buns", "cakes", "pies", "muffins", "cookies"), "sells", "bakes"),
    ("A farm", "pens", ("hens", "ducks", "goats", "sheep", "cows", "pigs"), "sells", "buys"),
    ("A school", "boxes", ("pencils", "pens", "rulers", "erasers", "markers", "crayons"), "gives out", "buys"),
    ("A library", "shelves", ("novels", "comics", "atlases", "poems", "maps", "magazines"), "lends out", "gets"),
    ("A garden", "rows", ("roses", "tulips", "lilies", "daisies", "carrots", "beans"), "picks", "plants"),
    ("A toy shop", "crates", ("balls", "kites", "dolls", "robots", "puzzles", "trains"), "sells", "orders"),
)  # fmt: skip
NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Ben", "Emma", "Noah", "Lily", "Max", "Ella", "Tom")
PRONOUN = {"Mia": "She", "Ava": "She", "Zoe": "She", "Emma": "She", "Lily": "She", "Ella": "She"}

Step = tuple[str, int]
"""An operation after the first product: ``("-", 5)``, ``("+", 8)``, ``("*", 2)``, ``("/", 2)``."""


def _apply(value: int, step: Step) -> int:
    op, k = step
    if op == "+":
        return value + k
    if op == "-":
        return value - k
    if op == "*":
        return value * k
    return value // k


INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}


def _draw_step(rng: random.Random, value: int, limit: int, prev: Step | None = None) -> Step:
    """A step whose result stays in 1..limit-1: doubling, halving (even numbers only), or
    adding or taking away 10-50; never one that undoes ``prev`` (doubling after halving)."""
    while True:
        r = rng.random()
        if r < 0.2 and value % 2 == 0:
            step: Step = ("/", 2)
        elif r < 0.4:
            step = ("*", 2)
        elif r < 0.7:
            step = ("-", 10 * rng.randint(1, 5))
        else:
            step = ("+", 10 * rng.randint(1, 5))
        undoes = prev is not None and (INVERSE[step[0]], step[1]) == prev
        if 0 < _apply(value, step) < limit and not undoes:
            return step


def _draw_chain(rng: random.Random, n_steps: int, limit: int = LIMIT) -> tuple[int, int, list[Step]]:
    """``a`` groups of ``b`` (2-9 by 2-12), then ``n_steps`` steps, every result in 1..limit-1."""
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    value, steps = a * b, []
    for _ in range(n_steps):
        steps.append(_draw_step(rng, value, limit, steps[-1] if steps else None))
        value = _apply(value, steps[-1])
    return a, b, steps


def _final(a: int, b: int, steps: list[Step]) -> int:
    value = a * b
    for step in steps:
        value = _apply(value, step)
    return value


def _phrase(step: Step, minus: str, plus: str) -> str:
    op, k = step
    if op == "-":
        return f"{minus} {k}"
    if op == "+":
        return f"{plus} {k} more"
    return "doubles them" if op == "*" else "halves them"


def _lines(a: int, b: int, steps: list[Step], phrases: list[str], first: str) -> list[str]:
    """One line a step, led by the words it computes: ``first: a * b = v.``, then
    ``Sells 20: 36 - 20 = 16.`` for each step (``phrases``: the question's words for them)."""
    value = a * b
    out = [f"{first}: {a} * {b} = {value}."]
    for step, words in zip(steps, phrases, strict=True):
        new = _apply(value, step)
        out.append(f"{words[0].upper()}{words[1:]}: {value} {step[0]} {step[1]} = {new}.")
        value = new
    return out


def _size(text: str) -> int:
    """An upper bound, near enough, on the SmolLM2 tokens of ``text``: a space and every digit
    of each number, each word, each punctuation mark (longer words cost more)."""
    return sum(len(re.findall(p, text)) for p in (r"\d", r"\d+", r"[A-Za-z]+", r"[.,;:?]"))


def _word_parallel(rng: random.Random) -> Plan:
    """Drawn until the question is short (about 110 SmolLM2 tokens at most) and the total is
    below :data:`LIMIT`."""
    while True:
        plan = _draw_parallel(rng)
        if _size(plan.question) <= MAX_QUESTION_SIZE and plan.answer < LIMIT:
            return plan


def _draw_quantity(rng: random.Random) -> tuple[int, int, list[Step]]:
    """A chain of :data:`PATH_STEPS` steps that ends at one of :data:`COUNTS`."""
    while True:
        a, b, steps = _draw_chain(rng, PATH_STEPS)
        if _final(a, b, steps) in COUNTS:
            return a, b, steps


def _draw_parallel(rng: random.Random) -> Plan:
    place, container, pool, minus, plus = rng.choice(THEMES)
    items = rng.sample(pool, QUANTITIES)
    values: list[int] = []
    rows: list[str] = []
    paths: list[list[str | PlanBlock]] = []
    for item in items:
        name = item.capitalize()
        a, b, steps = _draw_quantity(rng)
        phrases = [_phrase(s, minus, plus) for s in steps]
        if rng.random() < 0.5:
            row = f"{name}: {a} {container} of {b}, {', '.join(phrases[:-1])}, then {phrases[-1]}."
        else:
            row = f"{name}: {a} {container} of {b}; {', '.join(phrases[:-1])} and {phrases[-1]}."
        values.append(_final(a, b, steps))
        rows.append(row)
        lines = _lines(a, b, steps, phrases, f"{a} {container} of {b}")
        paths.append([row, *lines, f"{name} = {values[-1]}."])
    ask = rng.choice(("How many are there in all?", "How many is that in all?", "What is the total?"))
    question = f"{place} has:\n" + "\n".join(rows) + f"\n{ask}"
    reduce: list[str | PlanBlock] = []
    total = values[0]
    for v in values[1:]:
        reduce.append(f"{total} + {v} = {total + v}.")
        total += v
    conclusion = ", ".join(f"{item.capitalize()} = {v}" for item, v in zip(items, values, strict=True))
    block = PlanBlock(outlines=[i.capitalize() for i in items], paths=paths, conclusion=conclusion + ".")
    return Plan(task="word_parallel", question=question, body=[block, *reduce, f"In all: {total}."],
                answer=total)  # fmt: skip


def _word_sequential(rng: random.Random) -> Plan:
    place, container, pool, minus, plus = rng.choice(THEMES)
    name, item = rng.choice(NAMES), rng.choice(pool)
    she = PRONOUN.get(name, "He")
    minus = {"gives out": "gives away"}.get(minus, minus)
    a, b, steps = _draw_chain(rng, rng.choice((3, 3, 4, 4, 5)))
    phrases = [_phrase(s, minus, plus) for s in steps]
    question = (
        f"{name} has {a} {container} of {b} {item}. {she} {', then '.join(phrases)}. "
        f"How many {item} does {name} have now?"
    )
    body: list[str | PlanBlock] = list(_lines(a, b, steps, phrases, f"{a} {container} of {b} {item}"))
    return Plan(task="word_sequential", question=question, body=body, answer=_final(a, b, steps))


WORD_TASKS: dict[str, Callable[[random.Random], Plan]] = {
    "word_parallel": _word_parallel,
    "word_sequential": _word_sequential,
}
