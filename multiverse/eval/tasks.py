"""Synthetic MapReduce problems with verifiable integer answers.

Every problem is a few independent sub-computations (Map) followed by an aggregation that
needs all of them (Reduce), so its solution has a natural Multiverse structure. Each record
carries the solution twice, built from ONE internal plan so the two always agree:

  - ``chain``: Multiverse text in the canonical SPEC 1.2 layout (``<Think>`` ... ``</Think>``,
    cue line, ``<Parallel>`` with a Goal of labelled Outlines, 2 to 6 Paths, a Conclusion;
    nesting up to depth 2 in the ``nested_max`` task);
  - ``sequential_chain``: the same reasoning as plain ``<Think>`` ... ``</Think>`` text.

The answer is kept apart (the assistant turn is ``chain + "\\n\\nAnswer: " + str(answer)``,
SPEC 1.3; see :func:`assistant_text`).

Invariants (tests check each):
  - ``grammar.validate(chain) == []`` and ``grammar.flatten(chain) == grammar.flatten(sequential_chain)``.
  - Deterministic: ``generate(n, seed, split)`` returns the same records for the same arguments.
  - Train and test are disjoint by construction: the split of a problem is a fixed function
    of its content (a hash of task + question, :func:`split_of`), whatever the seed; records
    within one call are distinct problems.
  - Answers are integers and equal the computation written out in the chain.

Tasks (small numbers, few templates; with the project tokenizer an assistant turn of the first
four is about 100-320 tokens, mean ~195, of ``wide_max`` 250-700, of ``countdown`` 530-750 (mean ~640),
and a chat prompt about 75-115):
  ``sum_products``  sum of the products of 2-5 pairs (a factor over 9 is split into tens + ones)
  ``max_total``     largest total among 2-4 lists of 2-4 digits
  ``vowel_sum``     vowels counted in each of 2-6 words (a fixed list of 40), counts added
  ``nested_max``    largest total of 2-3 groups, each a sum of 1-3 products (depth 2)
  ``wide_max``      largest total among 4-6 lists of 5-8 digits (long paths: # parallel ~2.3)
  ``countdown``     six counters r-w count down by 3 from 50-99; add the ends (long paths made
                    by a local rule: # parallel ~2.65 on the reference chains; the task the
                    shipped tiny models are trained and evaluated on)
  ``countdown_warmup``  the same with starts 10-39 (short paths): a training warm-up only

``python -m multiverse.eval.tasks OUT.jsonl --n 1000 --split train --seed 0`` writes a data set.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from multiverse.format import grammar, prompts

SPLITS = ("train", "test")
TEST_FRACTION_PERCENT = 10
"""Share of the problem space (by content hash) that belongs to the test split."""

WORDS = (
    "apple", "banana", "cat", "dog", "sky", "tree", "house", "river", "stone", "moon",
    "sun", "garden", "window", "paper", "orange", "lemon", "bread", "music", "table", "chair",
    "cloud", "rain", "snow", "bird", "fish", "horse", "tiger", "mouse", "road", "city",
    "light", "water", "fire", "earth", "queue", "idea", "audio", "rhythm", "gym", "piano",
)  # fmt: skip
VOWELS = "aeiou"
LETTERS = "ABCDEF"


# ----------------------------------------------------------------------------- records


@dataclass(slots=True)
class Record:
    """One problem with both solution texts. ``num_paths``: paths of the first top-level block;
    ``depth``: deepest nesting of ``<Parallel>`` blocks (1 or 2)."""

    id: str
    question: str
    chain: str
    sequential_chain: str
    answer: int
    task: str
    num_paths: int
    depth: int

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "question": self.question,
            "chain": self.chain,
            "sequential_chain": self.sequential_chain,
            "answer": self.answer,
            "task": self.task,
            "num_paths": self.num_paths,
            "depth": self.depth,
        }


# ----------------------------------------------------------------------------- plans


@dataclass(slots=True)
class _Block:
    """A Map/Reduce step: one outline and one path (lines and nested blocks) per branch."""

    outlines: list[str]
    paths: list[list[str | _Block]]
    conclusion: str


@dataclass(slots=True)
class _Plan:
    """A solved problem before rendering."""

    task: str
    question: str
    body: list[str | _Block] = field(default_factory=list)
    answer: int = 0

    @property
    def key(self) -> str:
        """Canonical content: the question states the whole problem, so it decides the split."""
        return problem_key(self.task, self.question)


def _render_parallel(items: list[str | _Block], prefix: str = "") -> str:
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            out.append(item + "\n")
            continue
        out.append(f"{grammar.CUE}\n<Parallel>\n<Goal>\n")
        labels = [f"{prefix}{k + 1}" for k in range(len(item.paths))]
        for label, text in zip(labels, item.outlines, strict=True):
            out.append(f"<Outline>\n{label}: {text}\n</Outline>\n")
        out.append("</Goal>\n")
        for label, path in zip(labels, item.paths, strict=True):
            if not path or not isinstance(path[0], str):
                raise ValueError("a path must start with a text line (it carries the label)")
            out.append(f"<Path>\n{label}: {_render_parallel(path, label + '.')}</Path>\n")
        out.append(f"<Conclusion>\n{item.conclusion}\n</Conclusion>\n</Parallel>\n")
    return "".join(out)


def _render_sequential(items: list[str | _Block]) -> list[str]:
    lines: list[str] = []
    for item in items:
        if isinstance(item, str):
            lines.append(item)
        else:
            for path in item.paths:
                lines.extend(_render_sequential(path))
    return lines


def _depth(items: list[str | _Block]) -> int:
    return max(
        (1 + max(_depth(p) for p in x.paths) for x in items if isinstance(x, _Block)), default=0
    )


def _to_record(plan: _Plan) -> Record:
    chain = "<Think>\n" + _render_parallel(plan.body) + "</Think>"
    sequential = "<Think>\n" + "".join(f"{x}\n" for x in _render_sequential(plan.body)) + "</Think>"
    first = next(x for x in plan.body if isinstance(x, _Block))
    digest = hashlib.sha256(plan.key.encode()).hexdigest()[:12]
    return Record(
        id=f"{plan.task}-{digest}",
        question=plan.question,
        chain=chain,
        sequential_chain=sequential,
        answer=plan.answer,
        task=plan.task,
        num_paths=len(first.paths),
        depth=_depth(plan.body),
    )


# ----------------------------------------------------------------------------- helpers


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


def _sum_products(rng: random.Random) -> _Plan:
    k = rng.randint(2, 5)
    pairs = [(rng.randint(2, 9), rng.choice(range(2, 13))) for _ in range(k)]
    products = [a * b for a, b in pairs]
    shown = [f"({a}, {b})" for a, b in pairs]
    adds, total = _add_chain(products)
    block = _Block(
        outlines=[f"{a} * {b}" for a, b in pairs],
        paths=[[_product_line(a, b)] for a, b in pairs],
        conclusion=f"Products: {', '.join(map(str, products))}.",
    )
    return _Plan(
        task="sum_products",
        question=f"What is the sum of the products of the pairs {_join(shown)}?",
        body=["Multiply each pair, then add.", block, adds],
        answer=total,
    )


def _largest_total(task: str, keys: list[str], lists: list[list[int]], outlines: list[str],
                   keyed_paths: bool) -> _Plan:  # fmt: skip
    """"``key: digits.`` for each list; which total is largest?" One path per list (prefixed
    with its key when ``keyed_paths``) adds it up; the Reduce takes the largest total."""
    totals: list[int] = []
    paths: list[list[str | _Block]] = []
    for key, values in zip(keys, lists, strict=True):
        adds, total = _add_chain(values)
        totals.append(total)
        paths.append([f"{key}: {adds}" if keyed_paths else adds])
    best = max(totals)
    described = " ".join(f"{key}: {', '.join(map(str, v))}." for key, v in zip(keys, lists, strict=True))
    block = _Block(outlines=outlines, paths=paths, conclusion=f"Totals: {', '.join(map(str, totals))}.")
    return _Plan(
        task=task,
        question=f"{described} What is the largest list total?",
        body=["Add each list, then take the largest.", block, f"The largest is {best}."],
        answer=best,
    )


def _max_total(rng: random.Random) -> _Plan:
    k = rng.randint(2, 4)
    names = list(LETTERS[:k])
    lists = [[rng.randint(1, 9) for _ in range(rng.randint(2, 4))] for _ in range(k)]
    return _largest_total("max_total", names, lists, [f"total of {n}" for n in names], keyed_paths=False)


def _vowel_line(word: str) -> tuple[str, int]:
    found = [c for c in word if c in VOWELS]
    if not found:
        return f"{word}: no vowels, so 0.", 0
    return f"{word}: {', '.join(found)}, so {len(found)}.", len(found)


def _vowel_sum(rng: random.Random) -> _Plan:
    k = rng.randint(2, 6)
    words = rng.sample(WORDS, k)
    lines, counts = zip(*(_vowel_line(w) for w in words), strict=True)
    adds, total = _add_chain(list(counts))
    block = _Block(
        outlines=list(words),
        paths=[[line] for line in lines],
        conclusion=f"Counts: {', '.join(map(str, counts))}.",
    )
    return _Plan(
        task="vowel_sum",
        question=f"Count the vowels in each word and add the counts: {', '.join(words)}.",
        body=["Count the vowels of each word, then add.", block, adds],
        answer=total,
    )


def _nested_max(rng: random.Random) -> _Plan:
    k = rng.randint(2, 3)
    sizes = [rng.randint(1, 3) for _ in range(k)]
    while max(sizes) < 2 or sum(sizes) > 4:
        sizes = [rng.randint(1, 3) for _ in range(k)]
    names = LETTERS[:k]
    groups = [[(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)] for n in sizes]
    totals: list[int] = []
    paths: list[list[str | _Block]] = []
    for name, pairs in zip(names, groups, strict=True):
        products = [a * b for a, b in pairs]
        if len(pairs) == 1:
            a, b = pairs[0]
            paths.append([f"{name}: {_product_line(a, b)}"])
            totals.append(a * b)
            continue
        adds, total = _add_chain(products)
        totals.append(total)
        inner = _Block(
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
    block = _Block(
        outlines=[f"total of {n}" for n in names],
        paths=paths,
        conclusion=f"Totals: {', '.join(map(str, totals))}.",
    )
    return _Plan(
        task="nested_max",
        question=f"{described} Which group has the largest sum of products? Give that sum.",
        body=[
            "Sum the products in each group, then take the largest.",
            block,
            f"The largest is {best}.",
        ],
        answer=best,
    )


def _wide_max(rng: random.Random) -> _Plan:
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


def _countdown(rng: random.Random, low: int = 50, high: int = 99, task: str = "countdown") -> _Plan:
    """Six long paths made by a local rule, little Map/Reduce overhead (# parallel about 2.6).

    Each path finds its counter's start by name (the one lookup), then counts down by 3 (every
    number depends only on the one before it) until the next step would go below 0; the Reduce
    adds the ends (``x mod 3``), so the answer needs every path. The counter name is written
    with a space before it everywhere (question, Outline, path), so it is the same token."""
    d = COUNTDOWN_STEP
    keys = list(COUNTERS)
    starts = [rng.randint(low, high) for _ in keys]
    paths: list[list[str | _Block]] = [
        [f"- {key} {' '.join(map(str, range(x, -1, -d)))}."]
        for key, x in zip(keys, starts, strict=True)
    ]
    ends = [x % d for x in starts]
    adds, total = _add_chain(ends)
    block = _Block(outlines=keys, paths=paths, conclusion=f"Ends: {', '.join(map(str, ends))}.")
    shown = ", ".join(f"{key} {x}" for key, x in zip(keys, starts, strict=True))
    return _Plan(
        task=task,
        question=f"Count down by {d} from {shown} as far as it goes. What is the sum of the ends?",
        body=[block, adds],
        answer=total,
    )


def _countdown_warmup(rng: random.Random) -> _Plan:
    """``countdown`` with starts 10-39: short paths, a training warm-up (curriculum) only."""
    return _countdown(rng, 10, 39, task="countdown_warmup")


TASKS: dict[str, Callable[[random.Random], _Plan]] = {
    "sum_products": _sum_products,
    "max_total": _max_total,
    "vowel_sum": _vowel_sum,
    "nested_max": _nested_max,
    "wide_max": _wide_max,
    "countdown": _countdown,
    "countdown_warmup": _countdown_warmup,
}
TRAINING_ONLY = ("countdown_warmup",)
"""Tasks that exist to warm a model up in training (a curriculum), not to be evaluated on."""
EVAL_TASKS = tuple(t for t in TASKS if t not in TRAINING_ONLY)
"""The default mix of ``multiverse eval --benchmark synthetic``."""
TOKENIZER_TASKS = ("sum_products", "max_total", "vowel_sum", "nested_max")
"""The tasks whose text trains the project tokenizer (fixed, so its vocabulary never changes)."""


# ----------------------------------------------------------------------------- public API


def problem_key(task: str, question: str) -> str:
    """The canonical content key of a problem (its split and id derive from it)."""
    return f"{task}:{question}"


def split_of(key: str) -> str:
    """The split a problem belongs to, from its content key alone (see :func:`problem_key`)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < TEST_FRACTION_PERCENT else "train"


def iter_records(
    seed: int = 0, split: str = "train", tasks: Iterable[str] | None = None
) -> Iterator[Record]:
    """Endless stream of distinct problems of ``split``, deterministic in ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or names}: choose from {sorted(TASKS)}")
    rng = random.Random(f"multiverse-tasks:{seed}")
    seen: set[str] = set()
    misses = 0
    while True:
        plan = TASKS[rng.choice(names)](rng)
        if plan.key in seen or split_of(plan.key) != split:
            misses += 1
            if misses > 100_000:
                raise RuntimeError(f"cannot find new {split} problems for tasks {names}")
            continue
        misses = 0
        seen.add(plan.key)
        yield _to_record(plan)


def generate(
    n: int, seed: int = 0, split: str = "train", tasks: Iterable[str] | None = None
) -> list[Record]:
    """``n`` distinct problems of ``split`` (tasks mixed uniformly unless ``tasks`` is given)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = iter_records(seed, split, tasks)
    return [next(stream) for _ in range(n)]


def write_jsonl(path: str | Path, records: Iterable[Record | dict]) -> int:
    """Write records one JSON object per line; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            row = rec.to_dict() if isinstance(rec, Record) else rec
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[Record]:
    """Read records written by :func:`write_jsonl`."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Record(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a task record ({exc})") from None
    return out


def user_text(record: Record, parallel: bool = True) -> str:
    """The user turn (SPEC 1.3): question + the parallel or sequential instruction."""
    return prompts.user_prompt(record.question, parallel)


def assistant_text(record: Record, parallel: bool = True) -> str:
    """The assistant turn (SPEC 1.3): the chain, then ``"\\n\\nAnswer: "`` and the answer."""
    chain = record.chain if parallel else record.sequential_chain
    return prompts.assistant_turn(chain, record.answer)


def corpus_text(n: int = 240, seed: int = 12345) -> list[str]:
    """Text for training the project tokenizer: questions, both chains and answers."""
    out = []
    for rec in generate(n, seed=seed, split="train", tasks=TOKENIZER_TASKS):
        out.append(user_text(rec, parallel=True))
        out.append(assistant_text(rec, parallel=True))
        out.append(assistant_text(rec, parallel=False))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m multiverse.eval.tasks", description=__doc__.splitlines()[0]
    )
    p.add_argument("output", help="JSONL file to write")
    p.add_argument("--n", type=int, default=1000, help="number of problems (default 1000)")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tasks", nargs="+", choices=sorted(TASKS), help="subset of tasks (default all)"
    )
    args = p.parse_args(argv)
    count = write_jsonl(args.output, generate(args.n, args.seed, args.split, args.tasks))
    print(f"wrote {count} {args.split} problems to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
