"""``multiverse demo`` (what ``make demo`` runs).

With the shipped tiny Multiverse model (``models/multiverse-tiny``) present, it solves a few
held-out synthetic problems with forking on and off and shows the branch tree, the answer,
# parallel and the speedup. Without it, it inspects the shipped example text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = Path(__file__).resolve().parent / "examples" / "example.txt"
DEFAULT_MODEL = REPO / "models" / "multiverse-tiny"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory (default: the shipped tiny model)")
    p.add_argument("--problems", type=int, default=3, help="held-out problems to solve")


def run(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if (model / "config.json").exists():
        try:
            from multiverse.demo_model import run_model_demo
        except ImportError:
            run_model_demo = None
        if run_model_demo is not None:
            return run_model_demo(model, args.problems)
    from multiverse.cli import main

    print(f"(no trained model at {model}: showing `multiverse inspect` on the shipped example)\n")
    return main(["inspect", str(EXAMPLE)])
