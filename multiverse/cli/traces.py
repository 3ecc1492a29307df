"""``multiverse grade-traces``: the released Multiverse-32B's stored outputs graded with our grader.

The grading is :mod:`multiverse.eval.traces`; this module reads the arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from multiverse.cli.inspection import TOKENIZER_HELP, token_counter
from multiverse.eval.traces import default_traces_dir, format_table, grade_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "directory",
        nargs="?",
        default=None,
        help="trace directory (default: traces/multiverse-32b in $MULTIVERSE_DATA, ./shared/data, "
        "../shared/data or next to a source checkout)",
    )
    p.add_argument("--tokenizer", metavar="DIR|NAME", help=TOKENIZER_HELP)
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (per-sample records included)"
    )
    p.add_argument(
        "--samples", action="store_true", help="also list every sample in the text report"
    )


def run(args: argparse.Namespace) -> int:
    try:
        directory = Path(args.directory) if args.directory else default_traces_dir()
    except ValueError as e:
        print(f"multiverse grade-traces: error: {e}", file=sys.stderr)
        return 2
    if not directory.is_dir():
        print(f"multiverse grade-traces: error: {directory}: no such directory", file=sys.stderr)
        return 2
    try:
        counter = token_counter(args.tokenizer)
        result = grade_dir(directory, counter)
    except ValueError as e:
        print(f"multiverse grade-traces: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(format_table(result))
    if args.samples:
        for s in result["sets"]:
            for x in s["samples"]:
                mark = "ok " if x["correct"] else "bad"
                print(
                    f"{s['set']}/{x['file']}: {mark} extracted={x['extracted']!r} "
                    f"reference={x['reference']!r} blocks={x['blocks']} "
                    f"# parallel={x['parallel_degree']:.3f}"
                )
    return 0
