"""``multiverse eval``: pass@1, # parallel, trigger rate and speedup of a model on a benchmark.

The measurement is :func:`multiverse.eval.evaluate.evaluate`; this module loads the model and
the problems, runs it at each ``--batch-size`` and writes ``results.json``, ``results.md`` and
``speedup.png`` (:func:`multiverse.cli.pictures.plot_speedup`).

``--benchmark synthetic`` without ``--tasks`` poses the tasks the model directory (the
``--adapter`` directory when given) records it was trained on (:func:`multiverse.eval.datasets.synthetic_tasks_for`, training-only tasks left
out) and says so on stderr; a model recording none gets the default mix with a warning.
Problems are asked with the SPEC 1.3 suffix the model records (``--sequential-prompt`` /
``--parallel-prompt`` choose), the parallel one when it records none; stderr says which.

A progress bar with ETA goes to stderr (tqdm; a line per batch without it). Ctrl-C writes the
results so far (``"complete": false`` in ``results.json``) and exits 130. ``results.json``
records the thread count (``--threads``), the torch/transformers versions and the git commit
(``environment``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from multiverse.cli.common import (
    UsageError,
    add_device_arguments,
    add_model_argument,
    add_remote_arguments,
    add_threads_argument,
    apply_threads,
    check_device,
    load_engine,
    record_dir,
    remote_engine,
    resolve_adapter,
    run_environment,
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
from multiverse.train.summary import prompt_format


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
    add_model_argument(p, or_remote=True)
    p.add_argument(
        "--benchmark",
        required=True,
        metavar="NAME|FILE",
        help=f"one of {', '.join(BENCHMARKS)}, or a JSON/JSONL file of question/answer records",
    )
    p.add_argument(
        "--limit",
        type=int,
        help="first N problems (default: all; synthetic: how many to draw, default 100)",
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
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic test problems (default 0)"
    )
    p.add_argument(
        "--no-speedup",
        action="store_true",
        help="skip the forking-off pass (no speedup; default: time both modes)",
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
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--sequential-prompt",
        action="store_true",
        help='ask with the SPEC 1.3 sequential suffix " Think step by step before answering." '
        "(default: the suffix the model records in train_summary.json, as generate and serve use; "
        "the parallel one for a model recording none, the benchmarks' SPEC 1.3 prompt)",
    )
    which.add_argument(
        "--parallel-prompt",
        action="store_true",
        help="ask with the parallel suffix even if the model records the sequential one "
        "(default: the recorded one, else the parallel one)",
    )
    add_device_arguments(p)
    add_threads_argument(p)
    add_remote_arguments(p)


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


def eval_prompt(args: argparse.Namespace, model: Path) -> tuple[bool, str]:
    """Whether problems are asked with the parallel suffix, and the line saying so: the flag,
    else the format ``model``'s ``train_summary.json`` records (the one
    :func:`multiverse.train.summary.prompt_format`, as for ``generate`` and ``serve``), else the
    parallel suffix (unlike ``generate``/``serve``, which then add none: a benchmark question is
    always posed as a SPEC 1.3 prompt)."""
    if args.sequential_prompt or args.parallel_prompt:
        which = "sequential" if args.sequential_prompt else "parallel"
        return not args.sequential_prompt, f"prompt format: SPEC 1.3 {which} suffix (--{which}-prompt)"
    fmt = prompt_format(model)
    if fmt is None:
        return True, (f"prompt format: SPEC 1.3 parallel suffix ({model} records no prompt format; "
                      "the benchmark default)")  # fmt: skip
    return fmt.parallel, f"prompt format: SPEC 1.3 {fmt.suffix} suffix ({fmt.source})"


def check_output_dir(out_dir: Path) -> None:
    """``--output`` made (when missing) and checked writable before any generation."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output {out_dir}: cannot write there ({e.strerror or e})") from None


def progress_stats(summary: dict[str, Any]) -> str:
    """The figures the progress bar shows ("-" before the first result)."""

    def show(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}"

    return f"accuracy={show(summary['accuracy'])} # parallel={show(summary['parallel_degree'])}"


class Progress:
    """Progress of the timed batches on stderr: a tqdm bar with ETA, or a line per batch."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.start: float | None = None

    def __call__(self, done: int, total: int, summary: dict[str, Any]) -> None:
        import time

        stats = progress_stats(summary)
        if self.bar is None and self.start is None:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label, unit="problem", file=sys.stderr)
            except ImportError:
                self.start = time.perf_counter()
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(stats, refresh=True)
            return
        elapsed = time.perf_counter() - (self.start or 0.0)
        eta = elapsed / done * (total - done) if done else float("nan")
        print(f"{self.label} {done}/{total} {stats} ETA {eta:.0f} s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    remote = remote_engine(args, "eval") if args.base_url else None  # the fork/join driver
    if remote is None:
        if args.model is None:
            raise UsageError("give --model DIR|FILE.gguf (a local model) or --base-url URL (a server)")
        if not Path(args.model).exists():  # a directory or a .gguf file; the engine checks the rest
            raise UsageError(f"--model {args.model}: not found (no such directory or file)")
        adapter = resolve_adapter(args.adapter)
        check_device(args.device)
        record = record_dir(Path(args.model), adapter)
    else:  # the model's record: --tokenizer DIR, else what the server advertises
        adapter, args.model = None, " ".join(args.base_url)
        record = Path(args.tokenizer) if args.tokenizer and Path(args.tokenizer).is_dir() else Path(args.model)
    task_names = args.tasks
    if args.benchmark == "synthetic" and not task_names:
        choice = synthetic_tasks_for(record)
        print(choice.message, file=sys.stderr)
        task_names = list(choice.tasks)
    parallel_prompt, note = eval_prompt(args, record)
    advertised = remote.infos[0].prompt_format if remote is not None and not record.is_dir() else None
    if advertised and not (args.sequential_prompt or args.parallel_prompt):
        parallel_prompt = advertised.get("suffix") == "parallel"
        note = f"prompt format: SPEC 1.3 {advertised.get('suffix')} suffix (as {args.model} says)"
    print(note, file=sys.stderr)
    problems = load_benchmark(args.benchmark, args.limit, args.data_dir, args.seed, args.kind, task_names)
    if not problems:
        raise UsageError(f"--benchmark {args.benchmark}: no problems")
    name = Path(args.benchmark).stem if args.benchmark not in BENCHMARKS else args.benchmark
    out_dir = Path(args.output) if args.output else Path("runs") / "eval" / name
    check_output_dir(out_dir)
    threads = apply_threads(args.threads)
    env = run_environment(threads)
    if remote is not None:  # results.json names the servers and the merge mode (exact / flat)
        env["remote"] = {"base_urls": [i.base_url for i in remote.infos], "model": remote.infos[0].model,
                         "merge": remote.merge}  # fmt: skip
    llm = remote if remote is not None else load_engine(Path(args.model), args.device, args.dtype, adapter,
                                                        cuda_graphs=args.cuda_graphs,
                                                        quantization=args.quantization)  # fmt: skip
    tokenizer = _tokenizer_of(llm, args.model)
    sizes = list(dict.fromkeys(args.batch_size))
    runs: list[EvalResult] = []
    for size in sizes:
        progress = Progress(f"batch {size}" if len(sizes) > 1 else "eval")
        try:
            runs.append(
                evaluate(
                    llm,
                    tokenizer,
                    problems,
                    benchmark=name,
                    model=str(args.model) + (f" + adapter {adapter}" if adapter is not None else ""),
                    batch_size=size,
                    max_tokens=args.max_tokens,
                    speedup=not args.no_speedup,
                    parallel_prompt=parallel_prompt,
                    baseline=args.baseline,
                    warmup=len(runs) == 0,
                    progress=progress,
                    environment=env,
                )
            )
        finally:
            progress.close()
        if runs[-1].interrupted:
            break
    result = runs[0]
    for extra in runs[1:]:
        if extra.n:
            summary = extra.summary()
            result.by_batch[extra.batch_size] = {k: summary[k] for k in _BATCH_KEYS}
    result.interrupted = any(r.interrupted for r in runs)
    paths = write_outputs(result, out_dir)
    if result.interrupted:
        print(f"multiverse eval: interrupted: wrote the {result.n} result(s) so far to "
              + ", ".join(str(p) for p in paths.values()), file=sys.stderr)  # fmt: skip
        return 130
    print(format_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(json.dumps(result.summary()))
    return 0
