"""``multiverse inspect``: branch tree, validation report and statistics of Multiverse text.

The analysis itself is :mod:`multiverse.eval.structure`; this module reads the arguments,
prints the reports and draws the pictures (:mod:`multiverse.cli.pictures`).

``--json`` prints one JSON object per input (a file, or a JSONL record); for a directory (or
with ``--summary``) the last line is the summary, ``{"summary": true, ...}``, with the
violations counted by kind. Line numbers are those of the file read.

Binary input (NUL bytes, or over 10% of it not UTF-8 / control characters) is refused with
one line naming the file; control characters in the text report are shown escaped (``\x1b``),
never written raw to the terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from multiverse.cli.common import UsageError
from multiverse.eval.structure import (
    Report,
    Source,
    TokenCounter,
    inspect_text,
    load_sources,
    report_lines,
    summarize,
)
from multiverse.format.tokenizer import BUILTIN_TOKENIZERS, is_builtin_tokenizer, resolve_tokenizer

TOKENIZER_HELP = (
    f"Hugging Face tokenizer directory, or {' / '.join(BUILTIN_TOKENIZERS)} (the released "
    "Multiverse-32B's Qwen2.5 tokenizer, built offline; extra qwen), for real token counts "
    "(default: the built-in approximate counter)"
)


def token_counter(tokenizer: str | None) -> TokenCounter:
    """The counter of a ``--tokenizer`` value: none (the built-in approximate counter), a
    tokenizer directory, or a built-in name (``qwen2.5``: its built, cached directory, named by
    the name in the reports)."""
    if not tokenizer or not is_builtin_tokenizer(tokenizer):
        return TokenCounter(tokenizer)
    try:
        path = resolve_tokenizer(tokenizer)
    except ImportError as e:
        raise ValueError(f"--tokenizer {tokenizer}: {e}") from None
    counter = TokenCounter(str(path))
    counter.name = f"{tokenizer} ({type(counter.tok).__name__})"
    return counter


def _tokens_range(text: str) -> tuple[int, int | None]:
    try:
        a, _, b = text.partition(":")
        start, end = int(a or 0), int(b) if b else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END token indices, got {text!r}") from None
    if start < 0 or (end is not None and end <= start):
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return start, end


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Multiverse text file, JSONL records, a trace file, a directory, or - for stdin")
    p.add_argument("--tokenizer", metavar="DIR|NAME", help=TOKENIZER_HELP)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per input, then the summary for a directory (default: text)")  # fmt: skip
    p.add_argument("--summary", action="store_true", help="only the summary over all inputs (default for a directory)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the attention mask with positions (first input; default: none)")
    p.add_argument("--plot-tokens", metavar="START:END", type=_tokens_range, default=None,
                   help="--plot only these token indices (a zoom; default: the whole text, pooled to "
                   "at most 1200 pixels)")  # fmt: skip
    p.add_argument("--html", metavar="FILE.html", help="write a page showing branches side by side (first input; default: none)")
    p.add_argument("--max-errors", type=int, default=20, help="issues listed per input in the text report (default 20)")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 (but \t \n \r) and C1


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\x1b``): safe to write to a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def check_text(source: Source) -> None:
    """Raise ``ValueError`` naming ``source`` when it is binary data rather than text."""
    text = source.text
    if "\x00" in text:
        raise ValueError(f"{source.name}: binary data, not text (it holds NUL bytes)")
    odd = text.count("\ufffd") + len(_CONTROL.findall(text))
    if odd > max(len(text) // 10, 16):
        raise ValueError(f"{source.name}: binary data, not text ({odd} of its {len(text)} characters are not "
                         "UTF-8 text or are control characters)")  # fmt: skip


def iter_reports(sources: list[Source], counter: TokenCounter) -> Iterator[Report]:
    for s in sources:
        yield inspect_text(s.text, counter, s.name, s.line_offset)


def run(args: argparse.Namespace) -> int:
    counter = token_counter(args.tokenizer)
    sources = load_sources(args.source)
    if not sources:
        raise ValueError(f"{args.source}: nothing to inspect")
    for source in sources:
        check_text(source)
    summary_only = args.summary or (Path(args.source).is_dir() and not args.json)
    with_summary = args.summary or Path(args.source).is_dir()
    reports = []
    for k, rep in enumerate(iter_reports(sources, counter)):
        reports.append(rep)
        if summary_only:
            if sys.stderr.isatty():
                print(f"\r{k + 1}/{len(sources)}", end="", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(rep.to_dict(), ensure_ascii=False))
        else:  # a line at a time: the tree of a 50 MB text is never one string
            sys.stdout.writelines(printable(line) + "\n" for line in report_lines(rep, counter, args.max_errors))
    if with_summary:
        summary = summarize(reports)
        if args.json:
            print(json.dumps({"summary": True, **summary}, ensure_ascii=False))
        else:
            print(
                f"files: {summary['files']}   valid: {summary['valid']}   with parallel blocks: "
                f"{summary['with_parallel']}   truncated: {summary['truncated']}\n"
                f"mean # parallel: {summary['mean_parallel_degree']:.3f} (all), "
                f"{summary['mean_parallel_degree_with_blocks']:.3f} (files with blocks)   "
                f"blocks: {summary['blocks']}   tokenizer: {summary['tokenizer']}"
            )
            kinds = list(summary["files_with_violation"].items())[:5]
            if kinds:
                print(printable("most common violations (files): " + "; ".join(f"{k} ({n})" for k, n in kinds)))
    if args.plot:
        from multiverse.cli.pictures import plot_mask

        try:
            plot_mask(reports[0], counter, args.plot, tokens=args.plot_tokens)
        except OSError as e:
            raise UsageError(f"--plot {args.plot}: cannot write ({e.strerror or e})") from None
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.html:
        from multiverse.cli.pictures import write_html

        try:
            write_html(reports[0], args.html)
        except OSError as e:
            raise UsageError(f"--html {args.html}: cannot write ({e.strerror or e})") from None
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
