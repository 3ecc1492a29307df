"""The synthetic task families: each draws one problem from an RNG and solves it as a :class:`Plan`.

See :mod:`multiverse.eval.tasks` for the list of tasks, their sizes and the invariants every
family keeps (valid chains, answers equal to the computation written out).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from multiverse.eval.task_plans import Plan, PlanBlock
from multiverse.eval.word_problems import WORD_TASKS

WORDS = (
    "apple", "banana", "cat", "dog", "sky", "tree", "house", "river", "stone", "moon",
    "sun", "garden", "window", "paper", "orange", "lemon", "bread", "music", "table", "chair",
    "cloud", "rain", "snow", "bird", "fish", "horse", "tiger", "mouse", "road", "city",
    "light", "water", "fire", "earth", "queue", "idea", "audio", "rhythm", "gym", "piano",
)  # fmt: skip
VOWELS = "aeiou"
LETTERS = "ABCDEF"


def _join(items: list[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _add_chain(values: list[int]) -> tuple[str, int]:
    """Running sum written two numbers at a time: ``"3 + 5 = 8. 8 + 2 = 10."``."""
    total = values[0]
    steps = []
    for v in values[1:]:
        steps.append(f"{total} + {v} = {total + v}.")
        total += v
    return " ".join(steps), total


def _product_line(a: int, b: int) -> str:
    if b < 10:
        return f"{a} * {b} = {a * b}."
    tens, ones = b - b % 10, b % 10
    if ones == 0:
        return f"{a} * {b} = {a * b}."
    return f"{a} * {b} = {a * tens} + {a * ones} = {a * b}."


# ----------------------------------------------------------------------------- tasks


def _sum_products(rng: random.Random) -> Plan:
    k = rng.randint(2, 5)
    pairs = [(rng.randint(2, 9), rng.choice(range(2, 13))) for _ in range(k)]
    products = [a * b for a, b in pairs]
    shown = [f"({a}, {b})" for a, b in pairs]
    adds, total = _add_chain(products)
    block = PlanBlock(
        outlines=[f"{a} * {b}" for a, b in pairs],
        paths=[[_product_line(a, b)] for a, b in pairs],
        conclusion=f"Products: {', '.join(map(str, products))}.",
    )
    return Plan(
        task="sum_products",
        question=f"What is the sum of the products of the pairs {_join(shown)}?",
        body=["Multiply each pair, then add.", block, adds],
        answer=total,
    )


def _largest_total(task: str, keys: list[str], lists: list[list[int]], outlines: list[str],
                   keyed_paths: bool) -> Plan:  # fmt: skip
    """"``key: digits.`` for each list; which total is largest?" One path per list (prefixed
    with its key when ``keyed_paths``) adds it up; the Reduce takes the largest total."""
    totals: list[int] = []
    paths: list[list[str | PlanBlock]] = []
    for key, values in zip(keys, lists, strict=True):
        adds, total = _add_chain(values)
        totals.append(total)
        paths.append([f"{key}: {adds}" if keyed_paths else adds])
    best = max(totals)
    described = " ".join(f"{key}: {', '.join(map(str, v))}." for key, v in zip(keys, lists, strict=True))
    block = PlanBlock(outlines=outlines, paths=paths, conclusion=f"Totals: {', '.join(map(str, totals))}.")
    return Plan(
        task=task,
        question=f"{described} What is the largest list total?",
        body=["Add each list, then take the largest.", block, f"The largest is {best}."],
        answer=best,
    )


def _max_total(rng: random.Random) -> Plan:
    k = rng.randint(2, 4)
    names = list(LETTERS[:k])
    lists = [[rng.randint(1, 9) for _ in range(rng.randint(2, 4))] for _ in range(k)]
    return _largest_total("max_total", names, lists, [f"total of {n}" for n in names], keyed_paths=False)


def _vowel_line(word: str) -> tuple[str, int]:
    found = [c for c in word if c in VOWELS]
    if not found:
        return f"{word}: no vowels, so 0.", 0
    return f"{word}: {', '.join(found)}, so {len(found)}.", len(found)


def _vowel_sum(rng: random.Random) -> Plan:
    k = rng.randint(2, 6)
    words = rng.sample(WORDS, k)
    lines, counts = zip(*(_vowel_line(w) for w in words), strict=True)
    adds, total = _add_chain(list(counts))
    block = PlanBlock(
        outlines=list(words),
        paths=[[line] for line in lines],
        conclusion=f"Counts: {', '.join(map(str, counts))}.",
    )
    return Plan(
        task="vowel_sum",
        question=f"Count the vowels in each word and add the counts: {', '.join(words)}.",
        body=["Count the vowels of each word, then add.", block, adds],
        answer=total,
    )


def _nested_max(rng: random.Random) -> Plan:
    k = rng.randint(2, 3)
    sizes = [rng.randint(1, 3) for _ in range(k)]
    while max(sizes) < 2 or sum(sizes) > 4:
        sizes = [rng.randint(1, 3) for _ in range(k)]
    names = LETTERS[:k]
    groups = [[(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)] for n in sizes]
    totals: list[int] = []
    paths: list[list[str | PlanBlock]] = []
    for name, pairs in zip(names, groups, strict=True):
        products = [a * b for a, b in pairs]
        if len(pairs) == 1:
            a, b = pairs[0]
            paths.append([f"{name}: {_product_line(a, b)}"])
            totals.append(a * b)
            continue
        adds, total = _add_chain(products)
        totals.append(total)
        inner = PlanBlock(
            outlines=[f"{a} * {b}" for a, b in pairs],
            paths=[[_product_line(a, b)] for a, b in pairs],
            conclusion=f"Products: {', '.join(map(str, products))}.",
        )
        paths.append([f"{name} has {len(pairs)} pairs.", inner, f"{name}: {adds}"])
    best = max(totals)
    described = " ".join(
        f"{n}: {', '.join(f'({a}, {b})' for a, b in pairs)}."
        for n, pairs in zip(names, groups, strict=True)
    )
    block = PlanBlock(
        outlines=[f"total of {n}" for n in names],
        paths=paths,
        conclusion=f"Totals: {', '.join(map(str, totals))}.",
    )
    return Plan(
        task="nested_max",
        question=f"{described} Which group has the largest sum of products? Give that sum.",
        body=[
            "Sum the products in each group, then take the largest.",
            block,
            f"The largest is {best}.",
        ],
        answer=best,
    )


def _wide_max(rng: random.Random) -> Plan:
    """Many long, independent paths and a short Map/Reduce overhead: # parallel about 2-3.
    Each path repeats the question's key ("List 3:"): the path finds its list by an exact
    match, and the sequential form says which list each line is about."""
    k = rng.randint(4, 6)
    lists = [[rng.randint(1, 9) for _ in range(rng.randint(5, 8))] for _ in range(k)]
    keys = [f"List {i + 1}" for i in range(k)]
    return _largest_total("wide_max", keys, lists, [f"list {i + 1}" for i in range(k)], keyed_paths=True)


COUNTERS = "rstuvw"
"""Names of the countdown counters (each `` r`` ... `` w`` is one token of the project BPE)."""
COUNTDOWN_STEP = 3


def _countdown(rng: random.Random, low: int = 50, high: int = 99, task: str = "countdown") -> Plan:
    """Six long paths made by a local rule, little Map/Reduce overhead (# parallel about 2.6).

    Each path finds its counter's start by name (the one lookup), then counts down by 3 (every
    number depends only on the one before it) until the next step would go below 0; the Reduce
    adds the ends (``x mod 3``), so the answer needs every path. The counter name is written
    with a space before it everywhere (question, Outline, path), so it is the same token."""
    d = COUNTDOWN_STEP
    keys = list(COUNTERS)
    starts = [rng.randint(low, high) for _ in keys]
    paths: list[list[str | PlanBlock]] = [
        [f"- {key} {' '.join(map(str, range(x, -1, -d)))}."]
        for key, x in zip(keys, starts, strict=True)
    ]
    ends = [x % d for x in starts]
    adds, total = _add_chain(ends)
    block = PlanBlock(outlines=keys, paths=paths, conclusion=f"Ends: {', '.join(map(str, ends))}.")
    shown = ", ".join(f"{key} {x}" for key, x in zip(keys, starts, strict=True))
    return Plan(
        task=task,
        question=f"Count down by {d} from {shown} as far as it goes. What is the sum of the ends?",
        body=[block, adds],
        answer=total,
    )


def _countdown_warmup(rng: random.Random) -> Plan:
    """``countdown`` with starts 10-39: short paths, a training warm-up (curriculum) only."""
    return _countdown(rng, 10, 39, task="countdown_warmup")


TASKS: dict[str, Callable[[random.Random], Plan]] = {
    "sum_products": _sum_products,
    "max_total": _max_total,
    "vowel_sum": _vowel_sum,
    "nested_max": _nested_max,
    "wide_max": _wide_max,
    "countdown": _countdown,
    "countdown_warmup": _countdown_warmup,
}
DEFAULT_TASKS = tuple(TASKS)
"""The default mix of :func:`multiverse.eval.tasks.generate` (no ``tasks`` given): the tasks
above, fixed so that adding a task never changes what the default draws."""
TASKS.update(WORD_TASKS)  # the word problems (multiverse.eval.word_problems): chosen by name
TRAINING_ONLY = ("countdown_warmup",)
"""Tasks that exist to warm a model up in training (a curriculum), not to be evaluated on."""
EVAL_TASKS = tuple(t for t in DEFAULT_TASKS if t not in TRAINING_ONLY)
"""The default mix of ``multiverse eval --benchmark synthetic`` (a model that records no
training tasks). Every task not in :data:`TRAINING_ONLY` can be evaluated: the word problems
are posed when the model records them or ``--tasks`` names them."""
TOKENIZER_TASKS = ("sum_products", "max_total", "vowel_sum", "nested_max")
"""The tasks whose text trains the project tokenizer (fixed, so its vocabulary never changes)."""
