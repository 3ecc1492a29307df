"""``multiverse inspect``: branch tree, validation report and statistics of Multiverse text.

The analysis itself is :mod:`multiverse.eval.structure`; this module reads the arguments,
prints the reports and draws the pictures (:mod:`multiverse.cli.pictures`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from multiverse.eval.structure import (
    Report,
    Source,
    TokenCounter,
    format_report,
    inspect_text,
    load_sources,
    summarize,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Multiverse text file, JSONL records, a trace file, a directory, or - for stdin")
    p.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer directory for real token counts")
    p.add_argument("--json", action="store_true", help="print one JSON object per input (JSONL)")
    p.add_argument("--summary", action="store_true", help="only the summary over all inputs (default for a directory)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the attention mask with positions (first input)")
    p.add_argument("--html", metavar="FILE.html", help="write a page showing branches side by side (first input)")
    p.add_argument("--max-errors", type=int, default=20, help="issues listed per input in the text report")


def iter_reports(sources: list[Source], counter: TokenCounter) -> Iterator[Report]:
    for s in sources:
        yield inspect_text(s.text, counter, s.name)


def run(args: argparse.Namespace) -> int:
    try:
        counter = TokenCounter(args.tokenizer)
        sources = load_sources(args.source)
    except ValueError as e:
        print(f"multiverse inspect: error: {e}", file=sys.stderr)
        return 2
    if not sources:
        print(f"multiverse inspect: error: {args.source}: nothing to inspect", file=sys.stderr)
        return 2
    summary_only = args.summary or Path(args.source).is_dir()
    reports = []
    for k, rep in enumerate(iter_reports(sources, counter)):
        reports.append(rep)
        if summary_only:
            if sys.stderr.isatty():
                print(f"\r{k + 1}/{len(sources)}", end="", file=sys.stderr)
            continue
        print(json.dumps(rep.to_dict(), ensure_ascii=False) if args.json else format_report(rep, counter, args.max_errors))
    if summary_only:
        summary = summarize(reports)
        if args.json:
            print(json.dumps(summary))
        else:
            print(
                f"files: {summary['files']}   valid: {summary['valid']}   with parallel blocks: "
                f"{summary['with_parallel']}   truncated: {summary['truncated']}\n"
                f"mean # parallel: {summary['mean_parallel_degree']:.3f} (all), "
                f"{summary['mean_parallel_degree_with_blocks']:.3f} (files with blocks)   "
                f"blocks: {summary['blocks']}   tokenizer: {summary['tokenizer']}"
            )
    if args.plot:
        from multiverse.cli.pictures import plot_mask

        plot_mask(reports[0], counter, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.html:
        from multiverse.cli.pictures import write_html

        write_html(reports[0], args.html)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
