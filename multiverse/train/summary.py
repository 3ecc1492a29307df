"""What a trained model directory records about its training: ``train_summary.json``.

``multiverse train`` writes the file next to the weights (:func:`write_summary`); a model
trained elsewhere can carry one written by hand with the same top-level fields. The fields
read back by :func:`read_training_record`:

  * ``tasks``: the synthetic task names of the training records (the ``task`` field of records
    made by :mod:`multiverse.eval.tasks`), in order of first appearance in the data; empty when
    no record named a task;
  * ``task_records``: records trained on per task;
  * ``records``: records trained on (read minus skipped);
  * ``mode``: ``multiverse`` or ``autoregressive``;
  * ``prompt``: the prompt format the model was trained with, ``{"suffix": "parallel"}``
    (SPEC 1.3 user turn, multiverse mode) or ``{"suffix": "sequential"}`` (autoregressive);
    :func:`prompt_format` is the one place that answers "which prompt does this model want"
    (``multiverse generate`` and the server call it).

The trainer's file adds ``config`` (the :class:`multiverse.train.trainer.TrainConfig`),
``attention``, ``global_step`` and ``data`` (the data report). This module is the one place
that reads the record; ``multiverse eval`` and ``multiverse demo`` default to its tasks
(:func:`multiverse.eval.datasets.synthetic_tasks_for`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiverse.train.data import DataReport
    from multiverse.train.trainer import TrainConfig

SUMMARY_FILE = "train_summary.json"


@dataclass(frozen=True, slots=True)
class TrainingRecord:
    """What ``path`` (a model directory's ``train_summary.json``) says the model learned."""

    path: Path
    tasks: tuple[str, ...]
    records: int | None = None
    mode: str | None = None
    prompt: str | None = None
    """``parallel`` or ``sequential``: the recorded prompt suffix (``None``: not recorded)."""


PROMPT_SUFFIXES = ("parallel", "sequential")
"""The recorded prompt formats: the SPEC 1.3 parallel or sequential user-turn suffix."""
SUFFIX_OF_MODE = {"multiverse": "parallel", "autoregressive": "sequential"}
"""The prompt suffix each training mode trains with (and implies when none is recorded)."""


@dataclass(frozen=True, slots=True)
class PromptFormat:
    """The prompt format a model wants: ``suffix`` (``parallel`` | ``sequential``) and where
    that comes from (``source``, for the message telling the user)."""

    suffix: str
    source: str

    @property
    def parallel(self) -> bool:
        return self.suffix == "parallel"


def prompt_format(model: str | Path) -> PromptFormat | None:
    """The prompt format the model directory ``model`` records: its ``train_summary.json``'s
    ``prompt.suffix``, else the one its ``mode`` implies (multiverse -> parallel, autoregressive
    -> sequential); ``None`` when it records neither (or has no record, e.g. a ``.gguf`` file).

    Raises ``ValueError`` naming the file when the record is invalid."""
    record = read_training_record(model)
    if record is None:
        return None
    if record.prompt is not None:
        return PromptFormat(record.prompt, f"{record.path}: prompt.suffix")
    implied = SUFFIX_OF_MODE.get(record.mode or "")
    if implied is None:
        return None
    return PromptFormat(implied, f"{record.path}: mode {record.mode}")


def _prompt_suffix_of(data: dict[str, Any], path: Path) -> str | None:
    prompt = data.get("prompt")
    if prompt is None:
        return None
    suffix = prompt.get("suffix") if isinstance(prompt, dict) else None
    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(
            f"{path}: 'prompt' must be {{\"suffix\": \"parallel\" | \"sequential\"}}, got {prompt!r}"
        )
    return str(suffix)


def training_summary(
    cfg: TrainConfig, backend: str, global_step: int, report: DataReport
) -> dict[str, Any]:
    """The ``train_summary.json`` of a finished run: the record's fields, then the run's
    config, attention backend, optimizer steps and data report."""
    return {
        "tasks": list(report.tasks),
        "task_records": dict(report.tasks),
        "records": report.records - len(report.skipped),
        "mode": cfg.mode,
        "prompt": {"suffix": SUFFIX_OF_MODE[cfg.mode]},
        "config": asdict(cfg),
        "attention": backend,
        "global_step": global_step,
        "data": {
            "records": report.records,
            "examples": report.examples,
            "forms": dict(report.forms),
            "skipped": [{"source": s.source, "reason": s.reason} for s in report.skipped],
        },
    }


def write_summary(output: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` as ``output/train_summary.json``; returns the file's path."""
    path = Path(output) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def read_training_record(model: str | Path) -> TrainingRecord | None:
    """The training record of the model directory ``model``; ``None`` when it has none
    (no ``train_summary.json``, or ``model`` is not a directory, e.g. a ``.gguf`` file).

    Raises ``ValueError`` naming the file when it exists but is not a valid record."""
    path = Path(model) / SUMMARY_FILE
    if not Path(model).is_dir() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    tasks = data.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{path}: 'tasks' must be a list of task names, got {tasks!r}")
    records = data.get("records")
    mode = data.get("mode")
    return TrainingRecord(
        path=path,
        tasks=tuple(dict.fromkeys(tasks)),
        records=records if isinstance(records, int) else None,
        mode=mode if isinstance(mode, str) else None,
        prompt=_prompt_suffix_of(data, path),
    )
