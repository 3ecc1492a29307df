"""``multiverse eval``: pass@1, # parallel, trigger rate and speedup of a model on a benchmark.

One run generates every prompt twice with greedy decoding, in batches of ``--batch-size``:
once with forking on (the Multiverse engine) and once with forking off (plain sequential
decoding of the same model, by default the same output with its branches decoded one after
another), same prompts, same batch size, same process (SPEC 2). Batches
alternate which mode goes first, and one untimed warm-up call per mode precedes the timing: the
first prompt generated in full, so the warm-up forks wherever the model forks and first-call
and first-fork costs stay out of the timings.

Ctrl-C during :func:`evaluate` returns the result so far with ``interrupted`` set (the CLI
writes it and exits 130); ``environment`` (threads, versions, commit) is recorded as given.

Reported (``results.json``, ``results.md``, ``speedup.png`` in ``--output``):
  - ``accuracy``: pass@1 of the forking-on outputs with :func:`multiverse.eval.grading.grade`
    (``accuracy_sequential`` for the forking-off outputs);
  - ``parallel_degree``: mean over samples of the engine's ``usage.parallel_degree``
    (all generated tokens / sequential depth; 1.0 for an output without blocks);
  - ``trigger_rate``: share of forking-on outputs with at least one ``<Parallel>`` block;
  - ``speedup``: total forking-off time / total forking-on time. Per batch too: with
    ``--batch-size 1`` that is per sample, which is what ``speedup.png`` plots against
    # parallel. ``--batch-size 1 8`` reruns both modes at each further size in the same run
    (accuracy and # parallel come from the first size): ``speedup_by_batch`` and
    ``by_batch`` in ``results.json``, one row per size in ``results.md``;
  - ``by_task`` (problems that name their task, as synthetic ones do): those metrics per task
    (speedup from the samples' batch times: exact per task at ``--batch-size 1``), a table in
    ``results.md`` for 2+ tasks; each sample carries its ``task`` and ``structure``.

The logic (:func:`evaluate`) takes any object with the engine's ``generate(prompts, params)``
and an injectable clock, so it is unit-tested with a scripted stand-in model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from multiverse.engine.policy import DEFAULT_MAX_TOKENS  # the backends' one default, re-exported
from multiverse.eval.datasets import Problem
from multiverse.eval.grading import extract_answer, grade
from multiverse.format import grammar
from multiverse.format.prompts import chat_prompt_input

log = logging.getLogger(__name__)

Clock = Callable[[], float]
CLOCK: Clock = time.perf_counter
"""The wall clock :func:`evaluate` uses unless given one."""


# ----------------------------------------------------------------------------- prompts


BASELINES = ("serial", "plain")
"""Forking-off modes for the speedup: ``serial`` (same output, branches one after another) or
``plain`` (the model decoded without forking: tags are ordinary tokens, causal attention)."""


# ----------------------------------------------------------------------------- results


@dataclass(slots=True)
class SampleResult:
    """One problem. Times and speedup are those of the sample's batch. ``task`` and
    ``structure`` come from the problem's meta (None for a benchmark without them)."""

    id: str
    kind: str
    reference: str
    text: str
    extracted: str | None
    correct: bool
    parallel_degree: float
    depth_tokens: int
    completion_tokens: int
    blocks: int
    max_depth: int
    batch: int
    time_parallel_s: float
    text_sequential: str | None = None
    correct_sequential: bool | None = None
    completion_tokens_sequential: int | None = None
    time_sequential_s: float | None = None
    speedup: float | None = None
    task: str | None = None
    structure: str | None = None


@dataclass(slots=True)
class EvalResult:
    benchmark: str
    model: str
    batch_size: int
    max_tokens: int
    prompt: str  # "parallel" | "sequential"
    samples: list[SampleResult] = field(default_factory=list)
    time_parallel_s: float = 0.0
    time_sequential_s: float | None = None
    by_batch: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Summaries of timing passes at further batch sizes (``--batch-size 1 8``), by size."""
    environment: dict[str, Any] = field(default_factory=dict)
    """What the timings depend on: threads, torch/transformers versions, git commit."""
    total: int | None = None
    """Problems asked for (``n`` is fewer when the run was interrupted)."""
    interrupted: bool = False

    @property
    def n(self) -> int:
        return len(self.samples)

    def summary(self) -> dict[str, Any]:
        s = self.samples
        triggered = [x for x in s if x.blocks]
        seq = [x.correct_sequential for x in s if x.correct_sequential is not None]
        speedup = (
            self.time_sequential_s / self.time_parallel_s
            if self.time_sequential_s is not None and self.time_parallel_s > 0
            else None
        )
        return {
            "benchmark": self.benchmark,
            "model": self.model,
            "n": self.n,
            "accuracy": _mean([float(x.correct) for x in s]),
            "accuracy_sequential": _mean([float(v) for v in seq]) if seq else None,
            "parallel_degree": _mean([x.parallel_degree for x in s]),
            "parallel_degree_triggered": _mean([x.parallel_degree for x in triggered]),
            "trigger_rate": _mean([float(bool(x.blocks)) for x in s]),
            "speedup": round(speedup, 4) if speedup is not None else None,
            "time_parallel_s": round(self.time_parallel_s, 4),
            "time_sequential_s": (
                round(self.time_sequential_s, 4) if self.time_sequential_s is not None else None
            ),
            "completion_tokens": sum(x.completion_tokens for x in s),
            "depth_tokens": sum(x.depth_tokens for x in s),
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "prompt": self.prompt,
            "complete": not self.interrupted,
            "problems_requested": self.total if self.total is not None else self.n,
            "environment": self.environment,
        } | self._batches(speedup) | _by_task(s)

    def _batches(self, speedup: float | None) -> dict[str, Any]:
        if not self.by_batch:
            return {}
        by_size = {str(self.batch_size): round(speedup, 4) if speedup is not None else None}
        by_size |= {str(b): r["speedup"] for b, r in self.by_batch.items()}
        out: dict[str, Any] = {"by_batch": {str(b): r for b, r in self.by_batch.items()}}
        if any(v is not None for v in by_size.values()):  # not with --no-speedup
            out["speedup_by_batch"] = by_size
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "samples": [asdict(x) for x in self.samples]}


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _by_task(samples: Sequence[SampleResult]) -> dict[str, Any]:
    """``{"by_task": {task: metrics}}`` when any sample names its task, else ``{}``."""
    out: dict[str, Any] = {}
    for name in sorted({x.task for x in samples if x.task is not None}):
        xs = [x for x in samples if x.task == name]
        seq = [float(x.correct_sequential) for x in xs if x.correct_sequential is not None]
        t_par, t_seq = sum(x.time_parallel_s for x in xs), sum(x.time_sequential_s or 0.0 for x in xs)
        timed = all(x.time_sequential_s is not None for x in xs) and t_par > 0
        out[name] = {
            "n": len(xs),
            "accuracy": _mean([float(x.correct) for x in xs]),
            "accuracy_sequential": _mean(seq) if seq else None,
            "parallel_degree": _mean([x.parallel_degree for x in xs]),
            "trigger_rate": _mean([float(bool(x.blocks)) for x in xs]),
            "speedup": round(t_seq / t_par, 4) if timed else None,
        }
    return {"by_task": out} if out else {}


# ----------------------------------------------------------------------------- evaluation


def _usage(out: Any, name: str, default: Any) -> Any:
    usage = getattr(out, "usage", None)
    value = getattr(usage, name, None) if usage is not None else None
    return default if value is None else value


def _default_params() -> Callable[..., Any]:
    from multiverse import SamplingParams

    return SamplingParams


def evaluate(
    llm: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    benchmark: str = "custom",
    model: str = "",
    batch_size: int = 1,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    speedup: bool = True,
    parallel_prompt: bool = True,
    baseline: str = "serial",
    params: Callable[..., Any] | None = None,
    clock: Clock | None = None,
    warmup: bool = True,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    environment: dict[str, Any] | None = None,
) -> EvalResult:
    """Generate, grade and time ``problems`` with ``llm`` (see the module docstring).

    ``llm.generate(prompts, params)`` must return one output per prompt, in order, with
    ``.text`` and ``.usage`` (``parallel_degree``, ``depth_tokens``, ``completion_tokens``);
    ``params(temperature=, max_tokens=, parallel=)`` builds the sampling parameters (default
    :class:`multiverse.SamplingParams`); generation stops where the backend ends an answer (EOS
    and the chat turn end: :func:`multiverse.engine.policy.end_ids`). ``progress(done, total, summary)`` is called before the first timed batch and after each.
    A ``KeyboardInterrupt`` during the timed batches returns the samples so far, with
    ``interrupted=True``.
    """
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch_size and max_tokens must be >= 1 (got {batch_size}, {max_tokens})")
    make = params or _default_params()
    now = clock or CLOCK
    on = make(temperature=0.0, max_tokens=max_tokens, parallel=True)
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    off_mode = {"parallel": False} if baseline == "plain" else {"parallel": True, "serial_branches": True}
    off = make(temperature=0.0, max_tokens=max_tokens, **off_mode)
    prompts = [chat_prompt_input(tokenizer, p.question, parallel_prompt) for p in problems]  # questions are text
    result = EvalResult(
        benchmark=benchmark,
        model=model,
        batch_size=batch_size,
        max_tokens=max_tokens,
        prompt="parallel" if parallel_prompt else "sequential",
        time_sequential_s=0.0 if speedup else None,
        environment=dict(environment or {}),
        total=len(prompts),
    )
    if warmup and prompts:  # the whole first answer: it forks where the model forks
        for sp in [on, off] if speedup else [on]:
            t0 = now()
            llm.generate(prompts[:1], sp)
            log.info("warm-up (%s): %.2f s, untimed", "forking on" if sp is on else "forking off", now() - t0)

    def timed(batch: list[str], sp: Any) -> tuple[list[Any], float]:
        start = now()
        outs = list(llm.generate(batch, sp))
        elapsed = now() - start
        if len(outs) != len(batch):
            raise RuntimeError(f"generate returned {len(outs)} outputs for {len(batch)} prompts")
        return outs, elapsed

    if progress is not None:
        progress(0, len(prompts), result.summary())
    try:
        _timed_batches(problems, prompts, batch_size, on, off if speedup else None, timed, result, progress)
    except KeyboardInterrupt:
        result.interrupted = True
        log.warning("interrupted after %d of %d problems", result.n, len(prompts))
    return result


def _timed_batches(
    problems: Sequence[Problem],
    prompts: list[str],
    batch_size: int,
    on: Any,
    off: Any | None,
    timed: Callable[[list[str], Any], tuple[list[Any], float]],
    result: EvalResult,
    progress: Callable[[int, int, dict[str, Any]], None] | None,
) -> None:
    speedup = off is not None
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start : start + batch_size]
        seq_outs: list[Any] | None = None
        t_seq: float | None = None
        if speedup and b % 2 == 1:  # alternate which mode runs first
            seq_outs, t_seq = timed(batch, off)
        par_outs, t_par = timed(batch, on)
        if speedup and b % 2 == 0:
            seq_outs, t_seq = timed(batch, off)
        log.debug("batch %d: %d prompt(s), on %.3f s, off %s s", b, len(batch), t_par,
                  "-" if t_seq is None else f"{t_seq:.3f}")  # fmt: skip
        result.time_parallel_s += t_par
        if t_seq is not None and result.time_sequential_s is not None:
            result.time_sequential_s += t_seq
        for k, out in enumerate(par_outs):
            prob = problems[start + k]
            result.samples.append(
                _sample(prob, out, b, t_par, seq_outs[k] if seq_outs else None, t_seq)
            )
        if progress is not None:
            progress(result.n, len(prompts), result.summary())


def _sample(
    prob: Problem, out: Any, batch: int, t_par: float, seq: Any | None, t_seq: float | None
) -> SampleResult:
    text = str(getattr(out, "text", ""))
    doc, _ = grammar.read(text)
    st = grammar.stats(doc)
    completion = int(_usage(out, "completion_tokens", len(getattr(out, "token_ids", []) or [])))
    sample = SampleResult(
        id=prob.id,
        kind=prob.kind,
        reference=prob.answer,
        text=text,
        extracted=extract_answer(text),
        correct=grade(text, prob.answer, prob.kind),
        parallel_degree=float(_usage(out, "parallel_degree", 1.0)),
        depth_tokens=int(_usage(out, "depth_tokens", completion)),
        completion_tokens=completion,
        blocks=st.blocks,
        max_depth=st.max_depth,
        batch=batch,
        time_parallel_s=round(t_par, 6),
        task=prob.meta.get("task"),
        structure=prob.meta.get("structure"),
    )
    if seq is not None and t_seq is not None:
        seq_text = str(getattr(seq, "text", ""))
        sample.text_sequential = seq_text
        sample.correct_sequential = grade(seq_text, prob.answer, prob.kind)
        sample.completion_tokens_sequential = int(
            _usage(seq, "completion_tokens", len(getattr(seq, "token_ids", []) or []))
        )
        sample.time_sequential_s = round(t_seq, 6)
        sample.speedup = round(t_seq / t_par, 4) if t_par > 0 else None
    return sample


# ----------------------------------------------------------------------------- reports


def format_markdown(result: EvalResult) -> str:
    s = result.summary()
    rows = [
        "| benchmark | n | pass@1 (forking on) | pass@1 (forking off) | # parallel | trigger rate "
        "| speedup | time on (s) | time off (s) | batch | max tokens |",
        "|" + "---|" * 11,
    ]
    for r in [s, *result.by_batch.values()]:
        rows.append(
            f"| {s['benchmark']} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['accuracy_sequential'])} "
            f"| {_num(r['parallel_degree'])} | {_pct(r['trigger_rate'])} | {_num(r['speedup'])} "
            f"| {_num(r['time_parallel_s'])} | {_num(r['time_sequential_s'])} | {r['batch_size']} "
            f"| {r['max_tokens']} |"
        )
    rows += [
        "",
        f"model: `{s['model']}`; prompt: {s['prompt']}; # parallel over outputs with blocks: "
        f"{_num(s['parallel_degree_triggered'])}",
    ]
    by_task = s.get("by_task", {})
    if len(by_task) > 1:
        rows += ["", "| task | n | pass@1 (forking on) | pass@1 (forking off) | # parallel "
                 "| trigger rate | speedup |", "|" + "---|" * 7]  # fmt: skip
        rows += [f"| {name} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['accuracy_sequential'])} "
                 f"| {_num(r['parallel_degree'])} | {_pct(r['trigger_rate'])} | {_num(r['speedup'])} |"
                 for name, r in by_task.items()]  # fmt: skip
    return "\n".join(rows)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def batch_points(result: EvalResult) -> list[tuple[float, float]]:
    """(mean # parallel, speedup) per batch: per sample when the batch size is 1."""
    points = []
    batches = sorted({x.batch for x in result.samples})
    for b in batches:
        xs = [x for x in result.samples if x.batch == b]
        if xs[0].speedup is None:
            continue
        points.append((sum(x.parallel_degree for x in xs) / len(xs), xs[0].speedup))
    return points
