"""What several commands share: the model reference and the device options.

A model reference (``--model``) is the same for ``generate``, ``serve``, ``eval`` and ``demo``:
a Hugging Face model directory (``config.json`` + safetensors + tokenizer) or a ``.gguf``
file; without ``--model`` the shipped ``multiverse-tiny`` is searched for
(:func:`multiverse.locations.find_model`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multiverse.locations import default_model_hint, find_model


class UsageError(ValueError):
    """Bad command-line input; the message names the option and what is wrong."""


def add_model_argument(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model",
        required=required,
        default=None,
        metavar="DIR|FILE.gguf",
        help="Hugging Face model directory or GGUF file"
        + ("" if required else f" (default: {default_model_hint()})"),
    )


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights and KV cache dtype (default float32)",
    )


def resolve_model(ref: str | None) -> Path:
    """The model ``--model`` names (or the shipped default), checked before anything loads."""
    if ref is None:
        return find_model()
    path = Path(ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {ref}: not a model directory (no config.json in it)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"--model {ref}: a file must be a .gguf checkpoint")
        return path
    raise UsageError(f"--model {ref}: not found (no such directory or file)")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for this command (see :func:`apply_threads`)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: 1 on a machine with 4 cores or fewer, else half "
        "the cores; forked branches already batch the work, and more threads than cores slow "
        "every step)",
    )


def default_threads() -> int:
    import os

    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else cores // 2


def apply_threads(n: int | None) -> int:
    """Set torch's intra-op threads to ``n`` (default :func:`default_threads`); returns it."""
    import torch

    if n is not None and n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    n = n or default_threads()
    torch.set_num_threads(n)
    return n
