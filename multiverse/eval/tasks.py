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

Word problems (:mod:`multiverse.eval.word_problems`; with the SmolLM2 tokenizer a question is
at most ~110 tokens):
  ``word_parallel``    a bakery's (farm's, school's, ...) 4 quantities, one line each: a product,
                       then two of doubling, halving, +/- 10-50, ending at a whole ten; the total.
                       One block whose paths restate their line; a Reduce of 3 sums: assistant
                       turn ~469-521, mean ~491; # parallel of the reference chain ~2.12
  ``word_sequential``  one person's quantity through 4-6 dependent steps, NO block (``chain`` ==
                       ``sequential_chain``, ``structure`` "sequential"): assistant turn ~75-131, mean ~101

Every record says its ``structure``: ``"parallel"`` (the chain has a ``<Parallel>`` block) or
``"sequential"`` (``num_paths`` and ``depth`` 0). The word problems are chosen by name only:
the default mix (:data:`DEFAULT_TASKS`: the seven tasks listed first; :data:`EVAL_TASKS`,
``multiverse eval``'s mix for a model that records no tasks: those but the warm-up) is as before.

The families live in :mod:`multiverse.eval.task_families` and
:mod:`multiverse.eval.word_problems`, the plan and its rendering in
:mod:`multiverse.eval.task_plans`.

``python -m multiverse.eval.tasks OUT.jsonl --n 1000 --split train --seed 0`` writes a data set
(``--tasks word_parallel word_sequential`` for the word problems).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from multiverse.eval.task_families import (  # noqa: F401 (the task registry is this module's API)
    COUNTDOWN_STEP,
    COUNTERS,
    DEFAULT_TASKS,
    EVAL_TASKS,
    TASKS,
    TOKENIZER_TASKS,
    TRAINING_ONLY,
)
from multiverse.eval.task_plans import Record, problem_key, to_record  # noqa: F401 (problem_key: API)
from multiverse.format import prompts

SPLITS = ("train", "test")
TEST_FRACTION_PERCENT = 10
"""Share of the problem space (by content hash) that belongs to the test split."""

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
    names = list(DEFAULT_TASKS) if tasks is None else list(tasks)
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
        yield to_record(plan)


def generate(
    n: int, seed: int = 0, split: str = "train", tasks: Iterable[str] | None = None
) -> list[Record]:
    """``n`` distinct problems of ``split``, tasks mixed uniformly (``tasks``, else
    :data:`DEFAULT_TASKS`: every task but the word problems)."""
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
        "--tasks", nargs="+", choices=sorted(TASKS),
        help="tasks to mix (default: all but word_parallel and word_sequential)",
    )
    args = p.parse_args(argv)
    count = write_jsonl(args.output, generate(args.n, args.seed, args.split, args.tasks))
    print(f"wrote {count} {args.split} problems to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
