"""Input records for the curator: JSONL or Parquet rows in the formats people have.

A row gives a question and a sequential chain: ``{question|problem|prompt, chain|thinking|
solution|sequential_chain|reasoning, answer}`` (s1K-1.1, MATH-500 and ``multiverse.eval.tasks``
field names), or chat ``messages`` (the first user turn is the question, the last assistant
turn the chain; its text after ``</Think>`` / ``Answer:`` is the answer when there is no
``answer`` field). The record id is the row's ``id`` (or ``source_id``), else a stable hash of
the question and the chain, so every input can be accounted for in the outputs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUESTION_KEYS = ("question", "problem", "prompt")
CHAIN_KEYS = ("chain", "thinking", "solution", "sequential_chain", "reasoning", "deepseek_thinking_trajectory")
_END_THINK_RE = re.compile(r"</think>", re.IGNORECASE)


@dataclass(slots=True)
class InputRecord:
    id: str
    question: str
    chain: str
    answer: str
    source: str  # "file:line"
    extra: dict[str, Any] = field(default_factory=dict)


class InputError(ValueError):
    pass


def stable_id(question: str, chain: str) -> str:
    return "rec-" + hashlib.sha256(f"{question}\n\x00\n{chain}".encode()).hexdigest()[:16]


def _from_messages(messages: list[Any]) -> tuple[str, str, str]:
    user = next((m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"), "")
    assistant = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if not assistant:
        raise InputError("'messages' has no assistant turn")
    text = assistant[-1]
    answer = ""
    m = _END_THINK_RE.search(text)
    if m:
        answer = re.sub(r"^\s*answer:\s*", "", text[m.end() :], flags=re.IGNORECASE).strip()
        text = text[: m.end()]
    return user, text, answer


def to_record(row: dict[str, Any], source: str) -> InputRecord:
    """One input row -> :class:`InputRecord`; raises :class:`InputError` with the reason."""
    if isinstance(row.get("messages"), list):
        question, chain, answer = _from_messages(row["messages"])
    else:
        question = next((str(row[k]) for k in QUESTION_KEYS if row.get(k) is not None), None)
        chain = next((str(row[k]) for k in CHAIN_KEYS if row.get(k) is not None), None)
        if question is None or chain is None:
            raise InputError("needs a question and a chain (chain|thinking|solution) or chat messages")
        answer = ""
    if row.get("answer") is not None:
        answer = str(row["answer"])
    rid = row.get("id", row.get("source_id"))
    rid = str(rid) if rid is not None else stable_id(question, chain)
    extra = {k: row[k] for k in ("task",) if k in row}
    return InputRecord(rid, question, chain, answer, source, extra)


def read_inputs(path: str | Path) -> tuple[list[InputRecord], list[tuple[str, str]]]:
    """``(records, [(source, reason), ...] for unusable rows)``; duplicate ids are unusable."""
    path = Path(path)
    rows: list[tuple[str, Any]] = []
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise InputError(f"reading {path.name} needs pyarrow (`pip install pyarrow`)") from e
        rows = [(f"{path.name}:row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"{path.name}:{lineno}", InputError(f"invalid JSON: {e.msg}")))
    records: list[InputRecord] = []
    bad: list[tuple[str, str]] = []
    seen: set[str] = set()
    for source, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise InputError(f"expected a JSON object, got {type(row).__name__}")
            rec = to_record(row, source)
        except InputError as e:
            bad.append((source, str(e)))
            continue
        if rec.id in seen:
            bad.append((source, f"duplicate id {rec.id}"))
            continue
        seen.add(rec.id)
        records.append(rec)
    return records, bad
