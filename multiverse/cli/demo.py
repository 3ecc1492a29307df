"""``multiverse demo`` (what ``make demo`` runs).

With a model (``--model``, with ``--adapter`` a LoRA adapter merged into it, or the shipped
``multiverse-tiny`` found by :func:`multiverse.locations.find_model`), it solves a few
held-out synthetic problems with forking on and off and shows the branch tree, the answer,
# parallel and the speedup. Without it, it inspects the shipped example text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multiverse.cli.common import (
    UsageError,
    add_model_argument,
    add_quantization_argument,
    add_remote_arguments,
    add_threads_argument,
    apply_threads,
    remote_engine,
    resolve_model_and_adapter,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "example.txt"
"""Package data: a Multiverse text shown when no model is found."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--problems", type=int, default=3, help="held-out problems to solve (default 3)")
    add_threads_argument(p)
    add_remote_arguments(p)
    add_quantization_argument(p)


def run(args: argparse.Namespace) -> int:
    if args.problems < 1:
        raise UsageError(f"--problems must be >= 1, got {args.problems}")
    threads = apply_threads(args.threads)
    if args.base_url:  # the fork/join driver over servers; the record: --tokenizer DIR
        from multiverse.cli.demo_model import run_model_demo

        llm = remote_engine(args, "demo")
        record = Path(args.tokenizer) if args.tokenizer else Path(" ".join(args.base_url))
        return run_model_demo(record, args.problems, threads=threads, remote=llm)
    adapter = None
    try:
        model, adapter = resolve_model_and_adapter(args.model, args.adapter)
    except UsageError as e:
        if args.model is not None or args.adapter is not None:  # one named on the command line must be there
            raise
        model = None
        reason = str(e)
    if model is not None:
        try:
            from multiverse.cli.demo_model import run_model_demo
        except ImportError as e:  # the `demo` extra (transformers) is missing
            reason = f"the engine cannot load models here ({e}); pip install 'multiverse[demo]'"
        else:
            return run_model_demo(model, args.problems, threads=threads, adapter=adapter,
                                  quantization=args.quantization)  # fmt: skip
    from multiverse.cli import main

    print(f"({reason}: showing `multiverse inspect` on the shipped example)\n")
    return main(["inspect", str(EXAMPLE)])
