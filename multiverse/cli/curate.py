"""``multiverse curate``: turn sequential reasoning chains into Multiverse data with any
OpenAI-compatible LLM (SPEC section 5; the library is :mod:`multiverse.curate`).

  multiverse curate run INPUT --output DIR --base-url URL --model NAME [--concurrency N]
      [--max-regen N] [--threshold 0.2] [--api-key-env OPENAI_API_KEY] [--max-requests N]
      [--max-tokens N] [--max-cost USD --price-in USD --price-out USD]
  multiverse curate report DIR
  multiverse curate eval [--truth tasks|TRACES_DIR] [--n 20] --output DIR --base-url URL --model NAME

``run`` writes ``DIR/curated.jsonl`` (a ``multiverse train --data`` file), ``DIR/rejected.jsonl``
(with reasons), ``DIR/journal.jsonl`` and ``DIR/run.json``; running it again resumes.

Exit status of ``run`` and ``eval``: 0 when every record was curated or rejected; 1 when the
endpoint refused the requests (HTTP 401/403/404/405); :data:`EXIT_PENDING` when records are left
pending otherwise (requests out of retries, a --max-requests/--max-tokens/--max-cost budget
reached); 130 after Ctrl-C. Running the same command again resumes the pending records.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

EXIT_PENDING = 3
"""Exit status of a run that leaves records pending (not refused, not interrupted)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="curate_command", metavar="SUBCOMMAND", parser_class=type(p))
    sub.required = True
    r = sub.add_parser("run", help="curate INPUT into DIR (resumes when run again)")
    r.add_argument("input", metavar="INPUT", help="JSONL or Parquet: {question, chain|thinking|solution, answer} or messages")
    _run_options(r)
    e = sub.add_parser("eval", help="score a curator configuration against chains with a known parallel form")
    e.add_argument("--truth", default="tasks", metavar="tasks|DIR",
                   help="'tasks' (synthetic, test split) or a traces directory (e.g. shared/data/traces/multiverse-32b)")
    e.add_argument("--n", type=int, default=20, help="records of ground truth (default 20)")
    e.add_argument("--seed", type=int, default=0)
    _run_options(e)
    rep = sub.add_parser("report", help="counts, failure reasons and costs of a run (report.md, report.json)")
    rep.add_argument("directory", metavar="DIR")
    rep.add_argument("--tokenizer", metavar="DIR|qwen2.5", default=None,
                     help="tokenizer of the # parallel counts: a tokenizer directory or qwen2.5 (the "
                     "released Multiverse-32B's; extra qwen); default: the built-in approximate counter")


def _run_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--output", "-o", required=True, metavar="DIR")
    r.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    r.add_argument("--model", required=True, metavar="NAME")
    r.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR", help="environment variable with the key (default OPENAI_API_KEY)")
    r.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight at once (default 8)")
    r.add_argument("--max-regen", type=int, default=2, metavar="N", help="regenerations (steps 3-5) before rejecting (default 2)")
    r.add_argument("--threshold", type=float, default=0.2, help="largest edit distance accepted (default 0.2)")
    r.add_argument("--max-requests", type=int, default=None, metavar="N", help="stop intake after N requests")
    r.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per request (default 120)")
    r.add_argument("--max-retries", type=int, default=6, metavar="N",
                   help="retries of a request (timeouts, 429, 5xx) before its record is left pending (default 6)")
    r.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the requests (default 0)")
    r.add_argument("--max-tokens", type=int, default=None, metavar="N", help="stop intake after N tokens (prompt + completion)")
    r.add_argument("--max-cost", type=float, default=None, metavar="USD", help="stop intake after this cost")
    r.add_argument("--price-in", type=float, default=0.0, metavar="USD", help="price per million prompt tokens")
    r.add_argument("--price-out", type=float, default=0.0, metavar="USD", help="price per million completion tokens")
    r.add_argument("--request-max-tokens", type=int, default=4096, metavar="N", help="completion tokens per request (default 4096)")
    r.add_argument("--fsync", action="store_true", help="fsync every journal/output line (survives power loss; slower)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


class _Progress:
    """A progress bar over the input records (tqdm: done / total, rate, ETA, with accepted,
    rejected, retries and tokens after it); a counter line where tqdm is not installed."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc="curate", unit="record", file=sys.stderr)

    def __call__(self, s: Any) -> None:
        done = s.skipped_done + s.accepted + s.rejected
        stats = dict(accepted=s.accepted, rejected=s.rejected, retries=s.retries,
                     tokens=s.prompt_tokens + s.completion_tokens)  # fmt: skip
        if self.bar is None:
            print("\r" + " | ".join(f"{k} {v}" for k, v in {"done": done, **stats}.items()),
                  end="", file=sys.stderr, flush=True)  # fmt: skip
            return
        self.bar.n = done
        # as strings: tqdm formats numbers to 3 significant digits (40000 tokens -> "4e+4")
        self.bar.set_postfix({k: str(v) for k, v in stats.items()}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def _execute(args: argparse.Namespace, records: list[Any], unusable: int) -> Any:
    """Run the pipeline over ``records`` with the run options of ``args``; prints the summary."""
    from multiverse.curate.pipeline import REFUSED, Run, RunConfig

    if args.concurrency < 1 or args.max_regen < 0 or not 0 <= args.threshold <= 1:
        raise ValueError("--concurrency must be >= 1, --max-regen >= 0, --threshold in [0, 1]")
    config = RunConfig(
        output=Path(args.output), base_url=args.base_url, model=args.model,
        api_key=os.environ.get(args.api_key_env), concurrency=args.concurrency, max_regen=args.max_regen,
        threshold=args.threshold, max_requests=args.max_requests, timeout=args.timeout,
        max_retries=args.max_retries, temperature=args.temperature, request_max_tokens=args.request_max_tokens,
        max_tokens=args.max_tokens, max_cost=args.max_cost, fsync=args.fsync, price_in=args.price_in,
        price_out=args.price_out,
    )  # fmt: skip
    progress = None if args.quiet else _Progress(len(records))
    job = Run(config, progress=progress)

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, job.stop)
        except (NotImplementedError, RuntimeError):
            pass
        return await job.run(records, unusable)

    s: Any = asyncio.run(main())
    if progress is not None:
        progress.close()
    print(f"{s.accepted} accepted, {s.rejected} rejected, {s.pending} pending "
          f"({s.skipped_done} done before, {unusable} unusable inputs); {s.requests} requests, "
          f"{s.retries} retries -> {args.output}")
    for line in pending_reasons(s):
        print(line)
    if s.stopped:
        print(f"intake stopped: {s.stopped}; run the same command again to resume")
    if s.stopped.startswith((f"{REFUSED}: HTTP 401", f"{REFUSED}: HTTP 403")) and not config.api_key:
        print(f"(no API key was sent: ${args.api_key_env} is not set; --api-key-env names the variable)")
    return s


def pending_reasons(s: Any, top: int = 3) -> list[str]:
    """Why records stayed pending, for the console (``run.json`` has every error): the most
    common request failures and the retries by reason."""
    if not s.pending or not (s.errors or s.retry_reasons):
        return []
    from collections import Counter

    why = Counter(e.split(": ", 1)[-1] for e in s.errors).most_common(top)
    parts = [f"{n} x {msg}" for msg, n in why]
    if s.retry_reasons:
        parts.append("retries: " + ", ".join(f"{k} {v}" for k, v in sorted(s.retry_reasons.items())))
    return [f"pending because: {'; '.join(parts)}"]


def _run(args: argparse.Namespace) -> int:
    from multiverse.curate.inputs import read_inputs

    records, bad = read_inputs(args.input)
    for source, reason in bad[:10]:
        print(f"skipped {source}: {reason}", file=sys.stderr)
    s = _execute(args, records, len(bad))
    return 1 if s.stopped.startswith(_refused()) else _pending_status(s)


def _pending_status(s: Any) -> int:
    """0, or (records left pending) a line saying how many and that a rerun resumes them, and
    :data:`EXIT_PENDING` (130 when the run was interrupted)."""
    if not s.pending:
        return 0
    print(f"{s.pending} record{'s' * (s.pending != 1)} left pending: run the same command again "
          "to resume them", file=sys.stderr)  # fmt: skip
    return 130 if s.stopped == "stopped by the user" else EXIT_PENDING


def _refused() -> str:
    from multiverse.curate.pipeline import REFUSED

    return REFUSED


def _eval(args: argparse.Namespace) -> int:
    import json

    from multiverse.curate import evaluate

    if args.truth != "tasks" and not Path(args.truth).is_dir():
        raise ValueError(f"--truth must be 'tasks' or a traces directory, got {args.truth}")
    truth = evaluate.ground_truth(args.truth, args.n, args.seed)
    if not truth:
        raise ValueError(f"no usable ground truth in {args.truth}")
    s = _execute(args, evaluate.inputs_of(truth), 0)
    if s.stopped.startswith(_refused()):
        return 1
    result = evaluate.score(truth, Path(args.output))
    result.update({"truth": args.truth, "model": args.model, "wall_s": s.wall_s,
                   "wall_s_note": "this invocation only (a resumed eval counts only what it ran)"})  # fmt: skip
    name = "synthetic tasks" if args.truth == "tasks" else Path(args.truth).name
    text = evaluate.table(result, name)
    (Path(args.output) / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (Path(args.output) / "eval.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return _pending_status(s)  # a pending record counts as missed in the scores above


def _report(args: argparse.Namespace) -> int:
    from multiverse.curate import report

    if not Path(args.directory).is_dir():
        raise ValueError(f"not a directory: {args.directory}")
    from multiverse.cli.inspection import token_counter

    rep = report.write(args.directory, token_counter(args.tokenizer))
    print(report.markdown(rep))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"report": _report, "eval": _eval}.get(args.curate_command, _run)(args)
