"""The output directory of a training run: refused when it holds something already (unless
``overwrite`` or ``resume``), an earlier run's checkpoints, log and model files (a full
model's or an adapter's) cleared for ``overwrite``, the latest checkpoint found for ``resume``,
the JSONL log read back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from multiverse.train.data import ConfigError
from multiverse.train.summary import SUMMARY_FILE

LOG_FILE = "train_log.jsonl"
"""One JSON object per logging step (step, epoch, loss, learning rate, ...)."""

MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
    "adapter_model.bin",
)  # fmt: skip
"""What a saved full model or PEFT adapter consists of (its tokenizer files are written over).
Left behind, a full model's ``config.json`` makes a new adapter's directory load as the old
model, and an old shard or adapter would be read with the new files."""


def read_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a ``train_log.jsonl`` (none when the file is missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_output(output: Path, overwrite: bool, resume: bool | str, base: str | None = None) -> None:
    """Refuse to train into an existing non-empty directory unless told to, and to overwrite
    ``base`` (the directory of the base model a LoRA adapter is saved for)."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: exists and is not a directory")
    if overwrite and base and output.resolve() == Path(base).resolve():
        raise ConfigError(f"--output {output} is the base model's directory: --overwrite would "
                          "delete the base the adapter is trained for; give another --output")  # fmt: skip
    if resume or overwrite or not output.is_dir():
        return
    entries = sorted(p.name for p in output.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (
            f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        )
        raise ConfigError(
            f"--output {output} is not empty ({shown}): give --overwrite to replace what is "
            "there, --resume to continue its run, or another --output"
        )


def clear_previous_run(output: Path) -> None:
    """Remove what an earlier run left that would mix with this one: its checkpoints, log,
    summary and model files (:data:`MODEL_FILES`)."""
    if not output.is_dir():
        return
    for path in output.glob("checkpoint-*"):
        if path.is_dir():
            shutil.rmtree(path)
    for name in (LOG_FILE, SUMMARY_FILE):
        (output / name).unlink(missing_ok=True)
    for pattern in MODEL_FILES:
        for path in output.glob(pattern):
            if path.is_file():
                path.unlink()


def latest_checkpoint(output: Path) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output)) if output.is_dir() else None
    if last is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* directory in {output} to resume from")
    return last
