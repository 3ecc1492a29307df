"""``multiverse demo`` with a trained model: held-out problems solved with forking on and off.

:func:`run_model_demo` loads a model directory into the engine (CPU, float32), draws
``n_problems`` problems from the *test* split of the synthetic task family
(:mod:`multiverse.eval.tasks`: the tasks the model directory records it was trained on,
training-only ones left out, :func:`multiverse.eval.datasets.synthetic_tasks_for`; the default
mix with a warning when it records none), says on stderr which, and for each one:

  * generates greedily with forking on (Multiverse prompt, SPEC 1.3) and prints the branch tree
    of the output (:func:`multiverse.eval.structure.draw_tree` over the tolerant reader's document);
  * grades the final answer against the reference (:func:`multiverse.eval.grading.grade`, exact);
  * prints # parallel (all generated tokens / sequential depth, SPEC 2) and the blocks,
    branches and engine-inserted tokens of the request;
  * generates the same prompt again with forking off (same model, same process: the same
    output with its branches decoded one after another, ``serial_branches``) and prints the
    wall-clock speedup, forking-off time / forking-on time, at batch size 1 (SPEC 2). The
    timing is made robust: one untimed warm-up per mode on a forced Multiverse output that
    forks (first-call and first-fork costs stay out), and problems alternate which mode runs
    first;
  * when the autoregressive twin is there (``twin_dir``, default ``autoregressive-tiny`` next
    to the model), solves the problem with it too (sequential prompt) for comparison.

Invariants: the problems are held out (``split="test"``, disjoint from any training file
made by ``python -m multiverse.eval.tasks --split train``) and fixed (same seed, same problems on
every run); generation stops at the chat end-of-turn token as well as at EOS (the backend's
:func:`multiverse.engine.policy.end_ids`); nothing is written to disk.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multiverse.eval.evaluate import DEFAULT_MAX_TOKENS as MAX_TOKENS
from multiverse.locations import ADAPTER_CONFIG

DEMO_SEED = 2026
"""Seed of the held-out problems the demo draws (any seed gives test-split problems)."""


@dataclass(slots=True)
class TwinResult:
    """The autoregressive twin on the same problem (sequential prompt, forking off)."""

    answer: str | None
    correct: bool
    tokens: int
    seconds: float


@dataclass(slots=True)
class DemoResult:
    """One problem solved twice (forking on, then off)."""

    task: str
    question: str
    reference: str
    text: str
    answer: str | None
    correct: bool
    parallel_degree: float
    completion_tokens: int
    depth_tokens: int
    forced_tokens: int
    blocks: int
    branches: int
    seconds_on: float
    seconds_off: float
    tokens_off: int
    correct_off: bool
    twin: TwinResult | None = None

    @property
    def speedup(self) -> float:
        return self.seconds_off / self.seconds_on if self.seconds_on > 0 else float("nan")


def demo_problems(n: int, task_names: Sequence[str], seed: int = DEMO_SEED) -> list[Any]:
    """``n`` held-out problems, cycling through ``task_names``."""
    from multiverse.eval import tasks

    names = list(task_names)
    streams = {name: tasks.iter_records(seed, "test", [name]) for name in names}
    return [next(streams[names[k % len(names)]]) for k in range(n)]


def _timed(llm: Any, question: str, parallel: bool, prompt_parallel: bool, max_tokens: int,
           serial: bool = False):  # fmt: skip
    """One greedy generation: (output, seconds)."""
    from multiverse import SamplingParams
    from multiverse.format.prompts import chat_prompt

    tok = llm.tokenizer
    prompt = chat_prompt(tok, question, parallel=prompt_parallel)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        parallel=parallel,
        serial_branches=serial,
    )
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    return out, time.perf_counter() - start


WARMUP_TEXT = (
    "<Think>\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n"
    "</Goal>\n<Path>\n1: a a a\n</Path>\n<Path>\n2: b b b\n</Path>\n<Conclusion>\nab\n"
    "</Conclusion>\n</Parallel>\n</Think>\n\nAnswer: 0"
)
"""The forced output of the warm-up: one block of two paths, so the warm-up forks and joins."""


def warm_up(llm: Any) -> None:
    """One untimed generation per timed mode (forking on, serial branches, plain) of a forced
    output that forks, so first-call and first-fork costs stay out of the timings."""
    from multiverse import SamplingParams

    for mode in ({"parallel": True}, {"parallel": True, "serial_branches": True}, {"parallel": False}):
        llm.generate(["warm up"], SamplingParams(temperature=0.0, forced_output=WARMUP_TEXT, **mode))


def solve(llm: Any, record: Any, max_tokens: int = MAX_TOKENS, twin: Any = None,
          off_first: bool = False) -> DemoResult:  # fmt: skip
    """Solve ``record`` with forking on (the answer shown) and off (the timing baseline), and
    with the autoregressive ``twin`` engine when given; ``off_first`` times forking off first."""
    from multiverse.eval.grading import extract_answer, grade

    reference = str(record.answer)
    if off_first:
        off, t_off = _timed(llm, record.question, True, True, max_tokens, serial=True)
    out, t_on = _timed(llm, record.question, True, True, max_tokens)
    if not off_first:
        off, t_off = _timed(llm, record.question, True, True, max_tokens, serial=True)
    twin_result = None
    if twin is not None:
        tw, t_tw = _timed(twin, record.question, False, False, max_tokens)
        twin_result = TwinResult(
            extract_answer(tw.text),
            grade(tw.text, reference, kind="exact"),
            len(tw.token_ids),
            t_tw,
        )
    u = out.usage
    return DemoResult(
        task=record.task,
        question=record.question,
        reference=reference,
        text=out.text,
        answer=extract_answer(out.text),
        correct=grade(out.text, reference, kind="exact"),
        parallel_degree=u.parallel_degree,
        completion_tokens=u.completion_tokens,
        depth_tokens=u.depth_tokens,
        forced_tokens=u.forced_tokens,
        blocks=u.blocks,
        branches=u.branches,
        seconds_on=t_on,
        seconds_off=t_off,
        tokens_off=len(off.token_ids),
        correct_off=grade(off.text, reference, kind="exact"),
        twin=twin_result,
    )


def format_result(k: int, n: int, r: DemoResult, counter: Any) -> str:
    """The report of one problem: question, branch tree, answer, # parallel, speedup."""
    from multiverse.eval.structure import draw_tree
    from multiverse.format import grammar

    doc, issues = grammar.read(r.text)
    verdict = "correct" if r.correct else f"WRONG, expected {r.reference}"
    lines = [
        f"── problem {k}/{n} ({r.task}, held out) " + "─" * 20,
        r.question,
        "",
        draw_tree(doc, counter),
    ]
    if issues:
        lines.append(f"({len(issues)} format issue(s); first: {issues[0].message})")
    lines += [
        "",
        f"answer: {r.answer if r.answer is not None else '(none)'}  ({verdict})",
        f"# parallel: {r.parallel_degree:.2f}  ({r.completion_tokens} tokens over a depth of "
        f"{r.depth_tokens}; {r.blocks} block(s), {r.branches} branch(es), "
        f"{r.forced_tokens} tokens inserted by the engine)",
        f"time: forking on {r.seconds_on:.2f} s, forking off {r.seconds_off:.2f} s  ->  "
        f"speedup {r.speedup:.2f}x (batch 1; forking off = the same {r.tokens_off} tokens, "
        "one branch at a time)",
    ]
    if r.twin is not None:
        t = r.twin
        lines.append(
            f"autoregressive twin: {t.tokens} tokens in {t.seconds:.2f} s, answer "
            f"{t.answer if t.answer is not None else '(none)'} ({'right' if t.correct else 'wrong'})"
        )
    lines.append("")
    return "\n".join(lines)


def default_twin(record: Path) -> Path | None:
    """The autoregressive twin shipped next to a Multiverse model: the directory whose name has
    ``autoregressive`` for ``multiverse`` (``multiverse-tiny`` -> ``autoregressive-tiny``,
    ``smollm2-multiverse`` -> ``smollm2-autoregressive``), a model or an adapter directory."""
    name = record.resolve().name
    if "multiverse" not in name:
        return None
    twin = record.parent / name.replace("multiverse", "autoregressive")
    if (twin / "config.json").is_file() or (twin / ADAPTER_CONFIG).is_file():
        return twin
    return None


def run_model_demo(
    model_dir: str | Path,
    n_problems: int = 3,
    out: Any = None,
    twin_dir: str | Path | None = None,
    threads: int | None = None,
    adapter: str | Path | None = None,
    remote: Any = None,
    quantization: str | None = None,
) -> int:
    """Run the demo on the model in ``model_dir``; print to ``out`` (default stdout).

    ``remote``: a :class:`multiverse.remote.RemoteLLM` (``--base-url``) to run instead of a
    local engine; ``model_dir`` is then the model's record (``--tokenizer DIR``) or a label.

    ``adapter``: a LoRA adapter directory merged into ``model_dir`` (the base); its
    ``train_summary.json`` and tokenizer are then the model's.

    ``twin_dir``: the autoregressive twin to compare with (default: :func:`default_twin`;
    ``""`` for none); ``threads``: the torch thread count
    printed with the versions (default: torch's current one). Returns 0, or 2 with a one-line
    message when a model cannot be loaded."""
    out = out or sys.stdout
    model_dir = Path(model_dir)
    record = Path(adapter) if adapter is not None else model_dir
    if twin_dir is None:
        twin_dir = (default_twin(record) or "") if remote is None else ""
    if n_problems < 1:
        print(f"multiverse demo: error: --problems must be >= 1, got {n_problems}", file=sys.stderr)
        return 2
    import torch

    from multiverse import LLM
    from multiverse.cli.common import format_environment, run_environment
    from multiverse.eval.datasets import synthetic_tasks_for
    from multiverse.eval.structure import TokenCounter

    try:
        choice = synthetic_tasks_for(record)
    except ValueError as e:
        print(f"multiverse demo: error: {e}", file=sys.stderr)
        return 2
    print(choice.message, file=sys.stderr)
    try:
        extra = {"adapter": str(adapter)} if adapter is not None else {}
        quant = {"quantization": quantization} if quantization is not None else {}  # --quantization
        llm = remote if remote is not None else LLM(str(model_dir), device="cpu", dtype="float32", **extra, **quant)
        twin = LLM(str(twin_dir), device="cpu", dtype="float32", **quant) if twin_dir else None
    except (OSError, ValueError, ImportError) as e:
        print(f"multiverse demo: error: cannot load model: {e}", file=sys.stderr)
        return 2
    counter = TokenCounter(str(record) if record.is_dir() else None)
    print(
        f"Multiverse demo: {model_dir}{f' + adapter {adapter}' if adapter is not None else ''} on {n_problems} held-out synthetic problem(s) "
        f"({', '.join(choice.tasks)}), greedy, CPU, batch 1.\n"
        f"({format_environment(run_environment(threads or torch.get_num_threads()))})\n",
        file=out,
    )
    problems = demo_problems(n_problems, choice.tasks)
    for engine in ((llm, twin) if twin is not None else (llm,)) if remote is None else ():
        warm_up(engine)  # forced outputs: a local engine's test hook

    results = []
    for k, rec in enumerate(problems, 1):
        r = solve(llm, rec, twin=twin, off_first=k % 2 == 0)
        results.append(r)
        print(format_result(k, len(problems), r, counter), file=out, flush=True)

    correct = sum(r.correct for r in results)
    mean_par = sum(r.parallel_degree for r in results) / len(results)
    t_on = sum(r.seconds_on for r in results)
    t_off = sum(r.seconds_off for r in results)
    line = (
        f"summary: {correct}/{len(results)} correct, mean # parallel {mean_par:.2f}, "
        f"forking on {t_on:.2f} s vs off {t_off:.2f} s: speedup {t_off / t_on:.2f}x"
    )
    twins = [r.twin for r in results if r.twin is not None]
    if twins:
        line += (
            f"; autoregressive twin {sum(t.correct for t in twins)}/{len(twins)} correct "
            f"in {sum(t.seconds for t in twins):.2f} s"
        )
    print(line, file=out)
    return 0
