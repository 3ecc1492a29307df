"""``multiverse demo`` with a trained model: held-out problems solved with forking on and off.

:func:`run_model_demo` loads a model directory into the engine (CPU, float32), draws
``n_problems`` problems from the *test* split of the synthetic task family
(:mod:`multiverse.tasks`; one task after another, so three problems show three tasks), and
for each one:

  * generates greedily with forking on (Multiverse prompt, SPEC 1.3) and prints the branch tree
    of the output (:func:`multiverse.inspect.draw_tree` over the tolerant reader's document);
  * grades the final answer against the reference (:func:`multiverse.grading.grade`, exact);
  * prints # parallel (all generated tokens / sequential depth, SPEC 2) and the blocks,
    branches and engine-inserted tokens of the request;
  * generates the same prompt again with forking off (same model, same process) and prints
    the wall-clock speedup, forking-off time / forking-on time, at batch size 1.

Invariants: the problems are held out (``split="test"``, disjoint from any training file
made by ``python -m multiverse.tasks --split train``) and fixed (same seed, same problems on
every run); generation stops at the chat end-of-turn token as well as at EOS
(:func:`multiverse.evaluate.stop_token_ids`); nothing is written to disk.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_SEED = 2026
"""Seed of the held-out problems the demo draws (any seed gives test-split problems)."""

MAX_TOKENS = 600
"""Sequential-depth budget per answer (the synthetic solutions need at most ~330 tokens)."""


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

    @property
    def speedup(self) -> float:
        return self.seconds_off / self.seconds_on if self.seconds_on > 0 else float("nan")


def demo_problems(n: int, seed: int = DEMO_SEED) -> list[Any]:
    """``n`` held-out problems, cycling through the tasks in :data:`multiverse.tasks.TASKS`."""
    from multiverse import tasks

    names = list(tasks.TASKS)
    streams = {name: tasks.iter_records(seed, "test", [name]) for name in names}
    return [next(streams[names[k % len(names)]]) for k in range(n)]


def solve(llm: Any, record: Any, max_tokens: int = MAX_TOKENS) -> DemoResult:
    """Solve ``record`` with forking on (the answer shown) and off (the timing baseline)."""
    from multiverse import SamplingParams
    from multiverse.evaluate import chat_prompt, stop_token_ids
    from multiverse.grading import extract_answer, grade

    tok = llm.tokenizer
    prompt = chat_prompt(tok, record.question, parallel=True)
    stop = stop_token_ids(tok)

    def timed(parallel: bool) -> tuple[Any, float]:
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, parallel=parallel, stop_token_ids=stop
        )
        start = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        return out, time.perf_counter() - start

    out, t_on = timed(True)
    _, t_off = timed(False)
    reference = str(record.answer)
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
    )


def format_result(k: int, n: int, r: DemoResult, counter: Any) -> str:
    """The report of one problem: question, branch tree, answer, # parallel, speedup."""
    from multiverse import grammar
    from multiverse.inspect import draw_tree

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
        f"speedup {r.speedup:.2f}x (batch 1)",
        "",
    ]
    return "\n".join(lines)


def run_model_demo(model_dir: str | Path, n_problems: int = 3, out: Any = None) -> int:
    """Run the demo on the model in ``model_dir``; print to ``out`` (default stdout).

    Returns 0, or 2 with a one-line message when the model cannot be loaded."""
    out = out or sys.stdout
    model_dir = Path(model_dir)
    if n_problems < 1:
        print(f"multiverse demo: error: --problems must be >= 1, got {n_problems}", file=sys.stderr)
        return 2
    from multiverse import LLM, SamplingParams
    from multiverse.inspect import Counter

    try:
        llm = LLM(str(model_dir), device="cpu", dtype="float32")
    except (OSError, ValueError) as e:
        print(f"multiverse demo: error: cannot load model {model_dir}: {e}", file=sys.stderr)
        return 2
    counter = Counter(str(model_dir))
    print(
        f"Multiverse demo: {model_dir} on {n_problems} held-out synthetic problem(s), "
        "greedy, CPU, batch 1.\n",
        file=out,
    )
    problems = demo_problems(n_problems)
    warm = SamplingParams(temperature=0.0, max_tokens=4)
    llm.generate(["warm up"], warm)  # first-call costs stay out of the timings

    results = []
    for k, rec in enumerate(problems, 1):
        r = solve(llm, rec)
        results.append(r)
        print(format_result(k, len(problems), r, counter), file=out, flush=True)

    correct = sum(r.correct for r in results)
    mean_par = sum(r.parallel_degree for r in results) / len(results)
    t_on = sum(r.seconds_on for r in results)
    t_off = sum(r.seconds_off for r in results)
    print(
        f"summary: {correct}/{len(results)} correct, mean # parallel {mean_par:.2f}, "
        f"forking on {t_on:.2f} s vs off {t_off:.2f} s: speedup {t_off / t_on:.2f}x",
        file=out,
    )
    return 0
