"""Benchmark problems for ``multiverse eval``: the published sets in ``shared/data/benchmarks``,
the synthetic task family, or any JSON/JSONL file of question/answer records.

Every loader returns :class:`Problem` objects with the grading kind
(:data:`multiverse.eval.grading.KINDS`) that fits the benchmark: ``math`` for AIME and MATH-500,
``choice`` for GPQA-Diamond, ``exact`` for the synthetic tasks. A file's kind is inferred
(synthetic records -> exact, a single-letter answer to a question listing ``A)`` options ->
choice, else math) unless given.

Record fields accepted in files: the question as ``question`` / ``problem`` / ``prompt``, the
answer as ``answer`` / ``reference`` / ``final_answer``, an optional ``id`` / ``unique_id``.
Files are read as a JSON list when they start with ``[``, else as JSONL.

Which synthetic tasks fit a model: :func:`synthetic_tasks_for` reads what the model directory
records it was trained on (:func:`multiverse.train.summary.read_training_record`) and keeps
the evaluable tasks (not :data:`multiverse.eval.tasks.TRAINING_ONLY`); a model that records
none gets :data:`multiverse.eval.tasks.EVAL_TASKS` with a warning.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multiverse.locations import find_data
from multiverse.train.summary import read_training_record

BENCHMARK_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "aime24": (("aime24_figures.jsonl",), "math"),
    "aime25": (("aime2025-I.jsonl", "aime2025-II.jsonl"), "math"),
    "math500": (("MATH500_test.jsonl",), "math"),
    "gpqa": (("GPQA_DIAMOND_MC.json",), "choice"),
}
BENCHMARKS = ("synthetic", *BENCHMARK_FILES)

_QUESTION_KEYS = ("question", "problem", "prompt")
_ANSWER_KEYS = ("answer", "reference", "final_answer")
_ID_KEYS = ("id", "unique_id", "idx")


@dataclass(slots=True)
class Problem:
    """One evaluation item. ``answer`` is always a string; ``kind`` picks the grader."""

    id: str
    question: str
    answer: str
    kind: str = "math"
    meta: dict[str, Any] = field(default_factory=dict)


def read_records(path: Path) -> list[dict[str, Any]]:
    """JSON list or JSONL objects from ``path``; ValueError naming the file and line on bad input."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    for k, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: record {k} is a {type(row).__name__}, expected an object")
    return rows


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _infer_kind(row: dict[str, Any], question: str, answer: str) -> str:
    if "chain" in row and "task" in row:
        return "exact"
    if re.fullmatch(r"[A-J]", answer.strip()) and re.search(r"(?m)^\(?[A-D][).]", question):
        return "choice"
    return "math"


def problems_from_records(
    rows: list[dict[str, Any]], source: str, kind: str | None = None
) -> list[Problem]:
    out = []
    for k, row in enumerate(rows, 1):
        question = _first(row, _QUESTION_KEYS)
        answer = _first(row, _ANSWER_KEYS)
        if not isinstance(question, str) or answer is None:
            raise ValueError(
                f"{source}: record {k} needs a question ({'/'.join(_QUESTION_KEYS)}) and an "
                f"answer ({'/'.join(_ANSWER_KEYS)}); it has keys {sorted(row)[:10]}"
            )
        answer = str(answer)
        pid = _first(row, _ID_KEYS)
        meta = {
            key: row[key]
            for key in ("subject", "level", "task", "structure", "num_paths", "depth")
            if key in row
        }
        out.append(
            Problem(
                id=str(pid) if pid is not None else f"{Path(source).stem}-{k}",
                question=question,
                answer=answer,
                kind=kind or _infer_kind(row, question, answer),
                meta=meta,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class TaskChoice:
    """The synthetic tasks to pose a model, and the line saying why (for stderr).
    ``recorded``: the tasks come from the model's training record (else the default mix)."""

    tasks: tuple[str, ...]
    message: str
    recorded: bool


def synthetic_tasks_for(model: str | Path) -> TaskChoice:
    """The synthetic tasks the model in ``model`` was trained on, training-only ones left out.

    Falls back to :data:`multiverse.eval.tasks.EVAL_TASKS` (``recorded=False``, the message is a
    warning) when the directory records no task, or only tasks that are training-only or not
    synthetic tasks. Raises ``ValueError`` naming the file when the record is unreadable."""
    from multiverse.eval import tasks

    record = read_training_record(model)
    default = ", ".join(tasks.EVAL_TASKS)
    if record is None:
        return TaskChoice(
            tasks.EVAL_TASKS,
            f"warning: {model} records no training tasks (no train_summary.json); "
            f"evaluating the default synthetic mix: {default}",
            False,
        )
    chosen = tuple(t for t in record.tasks if t in tasks.TASKS and t not in tasks.TRAINING_ONLY)
    if not chosen:
        trained = ", ".join(record.tasks) or "no named task"
        return TaskChoice(
            tasks.EVAL_TASKS,
            f"warning: {record.path} records no evaluable synthetic task (trained on: "
            f"{trained}); evaluating the default synthetic mix: {default}",
            False,
        )
    left_out = [t for t in record.tasks if t in tasks.TRAINING_ONLY]
    note = f"; left out as training-only: {', '.join(left_out)}" if left_out else ""
    return TaskChoice(chosen, f"tasks: {', '.join(chosen)} (recorded in {record.path}{note})", True)


def load_benchmark(
    name: str,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    kind: str | None = None,
    tasks: list[str] | None = None,
) -> list[Problem]:
    """Problems of a named benchmark (:data:`BENCHMARKS`) or of a JSON/JSONL file path.

    ``synthetic`` draws ``limit`` (default 100) problems from the test split of
    :mod:`multiverse.eval.tasks` with ``seed`` (only ``tasks`` when given, else every task but the
    training-only warm-up, :data:`multiverse.eval.tasks.EVAL_TASKS`). ``limit`` keeps the first N of
    a fixed set.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    task_names = tasks
    if name == "synthetic":
        from multiverse.eval import tasks

        try:
            recs = tasks.generate(limit or 100, seed=seed, split="test", tasks=task_names or tasks.EVAL_TASKS)
        except ValueError as e:
            raise ValueError(f"--tasks: {e}") from None
        return problems_from_records([r.to_dict() for r in recs], "synthetic", kind)
    if name in BENCHMARK_FILES:
        files, default_kind = BENCHMARK_FILES[name]
        root = Path(data_dir) if data_dir is not None else find_data("benchmarks")
        problems: list[Problem] = []
        for fname in files:
            path = root / fname
            if not path.is_file():
                raise ValueError(f"benchmark {name!r}: {path} not found (use --data-dir)")
            part = problems_from_records(read_records(path), str(path), kind or default_kind)
            if len(files) > 1:  # ids unique across the parts
                stem = Path(fname).stem
                for p in part:
                    p.id = p.id if p.id.startswith(stem) else f"{stem}-{p.id}"
            problems.extend(part)
    else:
        path = Path(name)
        if not path.exists():
            raise ValueError(
                f"unknown benchmark {name!r}: choose one of {', '.join(BENCHMARKS)} or give a "
                "JSON/JSONL file with question/answer records"
            )
        problems = problems_from_records(read_records(path), str(path), kind)
    return problems[:limit] if limit else problems
