"""Natural-language word problems in two kinds: ``word_parallel`` and ``word_sequential``.

``word_parallel``: a bakery, farm, school, library or garden has 4 named quantities, each
computed by its own chain of four steps ("3 trays of 12 rolls" -> ``3 * 12 = 36``, "sells 20"
-> ``36 - 20 = 16``, "doubles them" -> ``16 * 2 = 32``, "bakes 30 more" -> ``32 + 30 = 62``);
the Reduce needs all of them (the largest or the smallest count). One block: short outlines
(the quantity's name), long paths (the quantity's steps, starting with its name), a short
conclusion, then the Reduce line.

``word_sequential``: one person's quantity goes through 4-6 dependent steps (each needs the
result before it); rendered without a block, so the Multiverse chain and the sequential chain
are the same plain ``<Think>`` text (forking would be wrong here).

The arithmetic is what a 135M model can get right after a short LoRA fine-tune: a product from
the times table (2-9 by 2-12), doubling, halving of even numbers, adding or taking away whole
tens (10-50). Each changes digits by a small fixed rule. General addition and subtraction (``36
- 17``, ``79 + 119``) are left out: SmolLM2-135M-Instruct got 9 of 60 two-digit sums and
differences right before fine-tuning, and the adapter trained on 1,000 problems of the first
version of these tasks (with additions and subtractions of 1-20) still got 87 of 322 of them
wrong on 80 held-out problems (1 of 292 products and halvings). Every intermediate result is in
1..199.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from multiverse.eval.task_plans import Plan, PlanBlock

LIMIT = 200
"""Every intermediate result is below this (and above 0)."""
MAX_QUESTION_SIZE = 96
"""A ``word_parallel`` question of at most this :func:`_size` has at most ~105 SmolLM2 tokens."""
QUANTITIES = 4
"""Quantities of a ``word_parallel`` problem. Four, not three: on a CPU a batch of 3 decode rows
costs as much as a batch of 4 (``benchmarks/fork_speed.py``, SmolLM2: 10.6 s for both), so a
fourth path is nearly free, and it lifts # parallel past 1.8."""
PATH_STEPS = 3
"""Steps after the product in each ``word_parallel`` path (four equations a path)."""

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


def _draw_step(rng: random.Random, value: int, limit: int) -> Step:
    """A step whose result stays in 1..limit-1: doubling, halving (even numbers only), or
    adding or taking away 10-50."""
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
        if 0 < _apply(value, step) < limit:
            return step


def _draw_chain(rng: random.Random, n_steps: int, limit: int = LIMIT) -> tuple[int, int, list[Step]]:
    """``a`` groups of ``b`` (2-9 by 2-12), then ``n_steps`` steps, every result in 1..limit-1."""
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    value, steps = a * b, []
    for _ in range(n_steps):
        steps.append(_draw_step(rng, value, limit))
        value = _apply(value, steps[-1])
    return a, b, steps


def _arith(a: int, b: int, steps: list[Step]) -> tuple[list[str], int]:
    """``["3 * 12 = 36.", "36 - 5 = 31.", ...]`` and the final value."""
    value = a * b
    out = [f"{a} * {b} = {value}."]
    for step in steps:
        new = _apply(value, step)
        out.append(f"{value} {step[0]} {step[1]} = {new}.")
        value = new
    return out, value


def _phrase(step: Step, minus: str, plus: str) -> str:
    op, k = step
    if op == "-":
        return f"{minus} {k}"
    if op == "+":
        return f"{plus} {k} more"
    return "doubles them" if op == "*" else "halves them"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _clause(rng: random.Random, container: str, item: str, a: int, b: int, phrases: list[str],
            first: bool) -> str:  # fmt: skip
    """One quantity of the question, in one of a few sentence forms (the first follows the
    opener "A bakery has", so it does not start with the item's name)."""
    form = rng.randrange(2 if first else 3)
    if form == 0:
        return f"{a} {container} of {b} {item}, {', '.join(phrases[:-1])}, then {phrases[-1]}"
    if form == 1:
        return f"{a} {container} of {b} {item}; {', '.join(phrases[:-1])} and {phrases[-1]}"
    return f"{item.capitalize()}: {a} {container} of {b}, {', '.join(phrases)}"


def _size(text: str) -> int:
    """An upper bound, near enough, on the SmolLM2 tokens of ``text``: a space and every digit
    of each number, each word, each punctuation mark (longer words cost more)."""
    return sum(len(re.findall(p, text)) for p in (r"\d", r"\d+", r"[A-Za-z]+", r"[.,;:?]"))


def _word_parallel(rng: random.Random) -> Plan:
    """Drawn until the question is short (about 105 SmolLM2 tokens at most) and the count it
    asks for (the largest or the smallest) belongs to one quantity only (the Reduce names it)."""
    while True:
        plan = _draw_parallel(rng)
        if plan is not None and _size(plan.question) <= MAX_QUESTION_SIZE:
            return plan


def _draw_parallel(rng: random.Random) -> Plan | None:
    """One draw; None when the count asked for is shared by two quantities."""
    place, container, pool, minus, plus = rng.choice(THEMES)
    items = rng.sample(pool, QUANTITIES)
    values: list[int] = []
    clauses: list[str] = []
    paths: list[list[str | PlanBlock]] = []
    for item in items:
        a, b, steps = _draw_chain(rng, PATH_STEPS)
        lines, value = _arith(a, b, steps)
        values.append(value)
        phrases = [_phrase(s, minus, plus) for s in steps]
        clause = _clause(rng, container, item, a, b, phrases, first=not clauses)
        clauses.append(clause if not clauses else clause[0].upper() + clause[1:])
        paths.append([f"{item.capitalize()}: {' '.join(lines)}"])
    question = f"{place} has {'. '.join(clauses)}."
    largest = rng.random() < 0.5
    pick = max(values) if largest else min(values)
    if values.count(pick) > 1:
        return None
    if largest:
        question += rng.choice((" How many are in the largest group?", " What is the largest count?"))
    else:
        question += rng.choice((" How many are in the smallest group?", " What is the smallest count?"))
    tail = f"{'Largest' if largest else 'Smallest'}: {items[values.index(pick)]} {pick}."
    conclusion = ", ".join(f"{item} {v}" for item, v in zip(items, values, strict=True))
    block = PlanBlock(outlines=list(items), paths=paths, conclusion=conclusion.capitalize() + ".")
    return Plan(task="word_parallel", question=question, body=[block, tail], answer=pick)


def _label(step: Step, minus: str, plus: str) -> str:
    """The short name of a step in the sequential chain: ``Sells``, ``Buys``, ``Doubles``
    (the amount is in the line that follows)."""
    op, k = step
    verb = {"-": minus.split()[0], "+": plus, "*": "doubles", "/": "halves"}[op]
    return verb[0].upper() + verb[1:]


def _word_sequential(rng: random.Random) -> Plan:
    place, container, pool, minus, plus = rng.choice(THEMES)
    name, item = rng.choice(NAMES), rng.choice(pool)
    she = PRONOUN.get(name, "He")
    minus = {"gives out": "gives away"}.get(minus, minus)
    a, b, steps = _draw_chain(rng, rng.choice((3, 3, 4, 4, 5)))
    lines, answer = _arith(a, b, steps)
    phrases = [_phrase(s, minus, plus) for s in steps]
    question = (
        f"{name} has {a} {container} of {b} {item}. {she} {', then '.join(phrases)}. "
        f"How many {item} does {name} have now?"
    )
    body: list[str | PlanBlock] = [f"Start: {lines[0]}"]
    body += [f"{_label(s, minus, plus)}: {line}" for s, line in zip(steps, lines[1:], strict=True)]
    return Plan(task="word_sequential", question=question, body=body, answer=answer)


WORD_TASKS: dict[str, Callable[[random.Random], Plan]] = {
    "word_parallel": _word_parallel,
    "word_sequential": _word_sequential,
}
