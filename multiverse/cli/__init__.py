"""The ``multiverse`` command line: one subcommand per module of this package.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only dispatches, importing the module lazily so optional extras stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("multiverse.cli.inspection", "parse, validate and show statistics of Multiverse text"),
    "generate": ("multiverse.cli.generate", "generate with the fork/join engine"),
    "serve": ("multiverse.cli.serve", "OpenAI-compatible server"),
    "train": ("multiverse.cli.train", "fine-tune a causal LM with Multiverse Attention"),
    "eval": ("multiverse.cli.evaluation", "accuracy, # parallel and speedup on a benchmark"),
    "grade-traces": ("multiverse.cli.traces", "grade real Multiverse-32B traces"),
    "demo": ("multiverse.cli.demo", "the end-to-end demo run by `make demo`"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, helptext) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, helptext)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="multiverse",
        description="Multiverse: natively parallel generation (Map / Process / Reduce).",
        epilog="`multiverse COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, helptext) in _available().items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_module=mod)
        importlib.import_module(mod).add_arguments(p)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from multiverse import __version__

    return f"multiverse {__version__}"


if __name__ == "__main__":
    sys.exit(main())
