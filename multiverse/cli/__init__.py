"""The ``multiverse`` command line: one subcommand per module of this package.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only dispatches, importing the module lazily so optional extras stay optional.

What every command shares is handled here once:

  * ``--log-level`` (before the command) sets the level of the ``multiverse`` loggers;
  * a bad argument, a :class:`multiverse.cli.common.UsageError`, an ``OSError`` or a load error
    (``ValueError``, a missing extra's ``ImportError``) becomes one line on stderr,
    ``multiverse COMMAND: error: ...``, and exit code 2; its traceback is logged at debug
    (``--log-level debug`` shows where it came from);
  * any other exception (a bug) is one line too, its traceback logged at error level (shown at
    every ``--log-level``), exit code 1;
  * Ctrl-C is exit code 130; a closed stdout (``multiverse inspect ... | head -1``) ends the
    command quietly with exit code 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import NoReturn

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("multiverse.cli.inspection", "parse, validate and show statistics of Multiverse text"),
    "generate": ("multiverse.cli.generate", "generate with the fork/join engine"),
    "serve": ("multiverse.cli.serve", "OpenAI-compatible server"),
    "train": ("multiverse.cli.train", "fine-tune a causal LM with Multiverse Attention"),
    "eval": ("multiverse.cli.evaluation", "accuracy, # parallel and speedup on a benchmark"),
    "grade-traces": ("multiverse.cli.traces", "grade real Multiverse-32B traces"),
    "curate": ("multiverse.cli.curate", "turn sequential reasoning chains into Multiverse data with an OpenAI-compatible LLM"),
    "demo": ("multiverse.cli.demo", "the end-to-end demo run by `make demo`"),
}

LOG_LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger("multiverse.cli")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: message``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, helptext) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, helptext)
    return out


def _command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names, or None (no command, ``--help``, ``--version``, a typo)."""
    it = iter(argv)
    for arg in it:
        if arg == "--log-level":
            next(it, None)
        elif not arg.startswith("--log-level="):
            return arg if arg in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``multiverse`` parser with every available subcommand's options, or with only the
    command ``only`` (its module alone is imported: ``inspect`` does not wait for torch)."""
    parser = OneLineParser(
        prog="multiverse",
        description="Multiverse: natively parallel generation (Map / Process / Reduce).",
        epilog="`multiverse COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="warning",
        help="messages of the multiverse loggers shown on stderr (default warning)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (mod, helptext) in _available().items():
        if only is not None and name != only:
            continue
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_module=mod)
        importlib.import_module(mod).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_command_of(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line argument error
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _setup_logging(args.log_level)
    prog = f"multiverse {args.command}"
    try:
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except (ValueError, OSError, ImportError) as e:  # UsageError is a ValueError
        log.debug("%s failed: %s: %s", prog, type(e).__name__, e, exc_info=True)  # the cause
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: the traceback always
        log.error("%s failed unexpectedly", prog, exc_info=True)
        print(f"{prog}: error: internal error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (the first line of a multi-line message)."""
    text = str(e).strip() or type(e).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 300 else first[:299] + "…"


def _setup_logging(level: str) -> None:
    log = logging.getLogger("multiverse")
    log.setLevel(level.upper())
    for old in [h for h in log.handlers if getattr(h, "_multiverse", False)]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)  # this call's stderr (tests capture it)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._multiverse = True  # type: ignore[attr-defined]
    log.addHandler(handler)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


def _version() -> str:
    from multiverse import __version__

    return f"multiverse {__version__}"


if __name__ == "__main__":
    sys.exit(main())
