"""``multiverse eval``: pass@1, # parallel, trigger rate and speedup of a model on a benchmark.

The measurement is :func:`multiverse.eval.evaluate.evaluate`; this module loads the model and
the problems, runs it at each ``--batch-size`` and writes ``results.json``, ``results.md`` and
``speedup.png`` (:func:`multiverse.cli.pictures.plot_speedup`).

``--benchmark synthetic`` without ``--tasks`` poses the tasks the model directory records it
was trained on (:func:`multiverse.eval.datasets.synthetic_tasks_for`, training-only tasks left
out) and says so on stderr; a model recording none gets the default mix with a warning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from multiverse.cli.common import (
    add_device_arguments,
    add_model_argument,
)
from multiverse.cli.pictures import plot_speedup
from multiverse.eval.datasets import BENCHMARKS, load_benchmark, synthetic_tasks_for
from multiverse.eval.evaluate import (
    BASELINES,
    DEFAULT_MAX_TOKENS,
    EvalResult,
    evaluate,
    format_markdown,
)
from multiverse.eval.grading import KINDS


def write_outputs(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and (when there are timings) speedup.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    paths["md"].write_text(format_markdown(result) + "\n")
    if plot_speedup(result, out / "speedup.png"):
        paths["png"] = out / "speedup.png"
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, required=True)
    p.add_argument(
        "--benchmark",
        required=True,
        metavar="NAME|FILE",
        help=f"one of {', '.join(BENCHMARKS)}, or a JSON/JSONL file of question/answer records",
    )
    p.add_argument(
        "--limit", type=int, help="first N problems (synthetic: how many to draw; default 100)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[1],
        metavar="B",
        help="prompts per generate call (default 1); several sizes (--batch-size 1 8) rerun the "
        "timing at each further size in the same run: speedup_by_batch in results.json",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"sequential-depth budget per output (default {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument(
        "--output", metavar="DIR", help="where results go (default runs/eval/<benchmark>)"
    )
    p.add_argument(
        "--data-dir", metavar="DIR", help="benchmark files (default ../shared/data/benchmarks)"
    )
    p.add_argument("--kind", choices=KINDS, help="grading kind (default: from the benchmark)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic test problems")
    p.add_argument(
        "--no-speedup", action="store_true", help="skip the forking-off pass (no speedup)"
    )
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default="serial",
        help="forking-off mode timed for the speedup: serial = the same output with its branches "
        "decoded one after another (like for like, default); plain = the model decoded plainly "
        "(tags as ordinary tokens, causal attention)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="synthetic only: tasks of multiverse.eval.tasks to pose (default: the tasks the "
        "model's train_summary.json records, training-only ones left out; without a record "
        "every task but the training-only ones, with a warning)",
    )
    p.add_argument(
        "--sequential-prompt",
        action="store_true",
        help='use " Think step by step before answering." (AR models) instead of the parallel one',
    )
    add_device_arguments(p)


_BATCH_KEYS = ("n", "accuracy", "accuracy_sequential", "parallel_degree", "trigger_rate", "speedup",
               "time_parallel_s", "time_sequential_s", "batch_size", "max_tokens")  # fmt: skip


def _tokenizer_of(llm: Any, model_dir: str) -> Any:
    for attr in ("tokenizer", "get_tokenizer"):
        tok = getattr(llm, attr, None)
        tok = tok() if callable(tok) and attr == "get_tokenizer" else tok
        if tok is not None:
            return tok
    from multiverse.format.tokenizer import load_tokenizer

    return load_tokenizer(model_dir)


def run(args: argparse.Namespace) -> int:
    err = "multiverse eval: error:"
    if not Path(args.model).exists():  # a directory or a .gguf file; the engine checks the rest
        print(f"{err} --model {args.model}: not found (no such directory or file)", file=sys.stderr)
        return 2
    task_names = args.tasks
    try:
        if args.benchmark == "synthetic" and not task_names:
            choice = synthetic_tasks_for(args.model)
            print(choice.message, file=sys.stderr)
            task_names = list(choice.tasks)
        problems = load_benchmark(
            args.benchmark, args.limit, args.data_dir, args.seed, args.kind, task_names
        )
    except ValueError as e:
        print(f"{err} {e}", file=sys.stderr)
        return 2
    if not problems:
        print(f"{err} {args.benchmark}: no problems", file=sys.stderr)
        return 2
    try:
        from multiverse import LLM
    except ImportError as e:
        print(f"{err} the engine is not available ({e})", file=sys.stderr)
        return 2
    try:
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        tokenizer = _tokenizer_of(llm, args.model)
    except (OSError, ValueError) as e:
        print(f"{err} cannot load model {args.model}: {e}", file=sys.stderr)
        return 2
    name = Path(args.benchmark).stem if args.benchmark not in BENCHMARKS else args.benchmark
    sizes = list(dict.fromkeys(args.batch_size))
    try:
        runs = []
        for size in sizes:
            if len(sizes) > 1:
                print(f"batch size {size}:", file=sys.stderr)
            runs.append(
                evaluate(
                    llm,
                    tokenizer,
                    problems,
                    benchmark=name,
                    model=str(args.model),
                    batch_size=size,
                    max_tokens=args.max_tokens,
                    speedup=not args.no_speedup,
                    parallel_prompt=not args.sequential_prompt,
                    baseline=args.baseline,
                    warmup=len(runs) == 0,
                    progress=lambda line: print(line, file=sys.stderr),
                )
            )
    except ValueError as e:
        print(f"{err} {e}", file=sys.stderr)
        return 2
    result = runs[0]
    for extra in runs[1:]:
        summary = extra.summary()
        result.by_batch[extra.batch_size] = {k: summary[k] for k in _BATCH_KEYS}
    out_dir = Path(args.output) if args.output else Path("runs") / "eval" / name
    paths = write_outputs(result, out_dir)
    print(format_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(json.dumps(result.summary()))
    return 0
