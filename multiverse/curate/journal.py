"""The append-only request journal that makes a run resumable (``kill -9`` included).

One JSON line per finished LLM request: ``{"key", "record", "step", "reply", "finish_reason",
"usage"}``. The key (:func:`request_key`) is the SHA-256 of the record id, the step, the
request's messages (the inputs and the prompt text), the prompt version, the model and the
sampling parameters, so a request is reused only when all of them are the same.

Contract: :meth:`Journal.put` writes one whole line and flushes it to the operating system
before it returns (which survives ``kill -9`` of the process; with ``fsync=True`` it also
``fsync`` s, which survives a power loss but blocks the event loop for milliseconds per line);
a line cut short by a crash is dropped (and truncated away) when the journal is
opened again, so at most the request in flight is repeated. The same tail repair is offered
for the output files (:func:`repair_tail`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def request_key(record: str, step: str, messages: list[dict[str, str]], prompt_version: str,
                model: str, sampling: dict[str, Any]) -> str:  # fmt: skip
    blob = json.dumps([record, step, messages, prompt_version, model, sampling], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def repair_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut short by a crash)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every whole JSON line of ``path`` (missing file: ``[]``)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_line(f: Any, row: dict[str, Any], fsync: bool = False) -> None:
    """One whole JSON line, flushed (and ``fsync`` ed when asked)."""
    f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    f.flush()
    if fsync:
        os.fsync(f.fileno())


class Journal:
    def __init__(self, path: Path, fsync: bool = False):
        self.path = path
        self.fsync = fsync
        repair_tail(path)
        self.entries: dict[str, dict[str, Any]] = {row["key"]: row for row in read_jsonl(path) if "key" in row}
        self._f = path.open("a", encoding="utf-8")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        row = {"key": key, **entry}
        append_line(self._f, row, self.fsync)
        self.entries[key] = row

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        self._f.close()
