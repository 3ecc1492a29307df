"""Grading the released Multiverse-32B's stored outputs with the project's grader.

Input: a directory laid out like ``shared/data/traces/multiverse-32b`` (one sub-directory per
benchmark set, e.g. ``aime24/`` and ``math500/``, each holding ``*.txt`` trace files). A trace
file has the sections ``问题:`` (question), ``模型解答:`` (the whole sequence, chat prompt
included), ``提取的答案:`` (that run's extracted answer, optional), ``参考答案:`` (reference)
and ``是否正确:`` (that run's verdict, ``是`` = right / ``否`` = wrong).

Per set it reports pass@1 with :func:`multiverse.eval.grading.grade` on the assistant turn only
(never the prompt: the third-party prompt itself contains "the final answer is ...", which
is what fooled the stored verdicts) next to the stored verdicts' accuracy, the parallel
trigger rate (share of outputs with at least one ``<Parallel>`` block) and # parallel
(SPEC 2: all tokens / sequential depth, by the layout rule), counted with ``--tokenizer DIR``
or the built-in approximate counter of :mod:`multiverse.eval.structure`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def default_traces_dir() -> Path:
    """``shared/data/traces/multiverse-32b`` (:func:`multiverse.locations.find_data`)."""
    from multiverse.locations import find_data

    return find_data("traces/multiverse-32b", option="DIRECTORY")

SECTIONS = ("问题:", "模型解答:", "提取的答案:", "参考答案:", "是否正确:")


@dataclass(slots=True)
class Trace:
    """One trace file, split into its sections."""

    path: Path
    question: str
    sequence: str  # the model's whole sequence, chat prompt included
    reference: str
    stored_verdict: bool | None  # None when the file has no readable verdict
    stored_extracted: str | None


def parse_trace(path: Path) -> Trace:
    """Split a trace file into its sections; raises ValueError naming what is missing."""
    text = path.read_text(encoding="utf-8", errors="replace")
    starts = {}
    for name in SECTIONS:
        m = re.search(rf"(?:^|\n){re.escape(name)}", text)
        if m:
            starts[name] = (m.start(), m.end())
    missing = [s for s in ("模型解答:", "参考答案:") if s not in starts]
    if missing:
        raise ValueError(f"{path}: not a trace file (no {' / '.join(missing)} section)")
    order = sorted(starts.items(), key=lambda kv: kv[1][0])

    def section(name: str) -> str | None:
        if name not in starts:
            return None
        k = [n for n, _ in order].index(name)
        end = order[k + 1][1][0] if k + 1 < len(order) else len(text)
        return text[starts[name][1] : end].strip("\n").removeprefix(" ")

    verdict_text = (section("是否正确:") or "").strip()
    verdict = (
        True if verdict_text.startswith("是") else False if verdict_text.startswith("否") else None
    )
    return Trace(
        path=path,
        question=(section("问题:") or "").strip(),
        sequence=section("模型解答:") or "",
        reference=(section("参考答案:") or "").strip(),
        stored_verdict=verdict,
        stored_extracted=section("提取的答案:"),
    )


def grade_trace(trace: Trace, counter: Any) -> dict[str, Any]:
    """Per-sample record: our verdict, the stored one, structure and # parallel."""
    from multiverse.eval.grading import extract_answer, grade
    from multiverse.eval.structure import extract_assistant, inspect_text

    assistant = extract_assistant(trace.sequence)
    report = inspect_text(assistant, counter, str(trace.path)).to_dict()
    return {
        "file": trace.path.name,
        "reference": trace.reference,
        "extracted": extract_answer(assistant),
        "correct": grade(assistant, trace.reference, "math"),
        "stored_correct": trace.stored_verdict,
        "blocks": report["blocks"],
        "max_depth": report["max_depth"],
        "valid": report["valid"],
        "truncated": report["truncated"],
        "total_tokens": report["total_tokens"],
        "depth_tokens": report["depth_tokens"],
        "parallel_degree": report["parallel_degree"],
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize_set(name: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(samples)
    stored = [s["stored_correct"] for s in samples if s["stored_correct"] is not None]
    triggered = [s for s in samples if s["blocks"]]
    return {
        "set": name,
        "n": n,
        "accuracy": _mean([float(s["correct"]) for s in samples]),
        "correct": sum(s["correct"] for s in samples),
        "stored_accuracy": _mean([float(v) for v in stored]),
        "stored_correct": sum(stored),
        "answered": sum(s["extracted"] is not None for s in samples),
        "truncated": sum(s["truncated"] for s in samples),
        "trigger_rate": _mean([float(bool(s["blocks"])) for s in samples]),
        "parallel_degree": _mean([s["parallel_degree"] for s in samples]),
        "parallel_degree_triggered": _mean([s["parallel_degree"] for s in triggered]),
        "blocks": sum(s["blocks"] for s in samples),
        "valid": sum(s["valid"] for s in samples),
    }


def grade_dir(directory: Path, counter: Any) -> dict[str, Any]:
    """Grade every set (sub-directory with ``*.txt``; the directory itself if it has none)."""
    sets = sorted(d for d in directory.iterdir() if d.is_dir() and any(d.glob("*.txt")))
    if not sets:
        sets = [directory] if any(directory.glob("*.txt")) else []
    if not sets:
        raise ValueError(f"{directory}: no *.txt trace files in it or its sub-directories")
    out: dict[str, Any] = {"directory": str(directory), "tokenizer": counter.name, "sets": []}
    all_samples: list[dict[str, Any]] = []
    for d in sets:
        files = sorted(d.glob("*.txt"), key=_natural)
        samples = [grade_trace(parse_trace(f), counter) for f in files]
        all_samples.extend(samples)
        summary = summarize_set(d.name, samples)
        summary["samples"] = samples
        out["sets"].append(summary)
    out["total"] = summarize_set("total", all_samples)
    return out


def _natural(path: Path) -> tuple[Any, ...]:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path.name))


def format_table(result: dict[str, Any]) -> str:
    head = (
        "| set | n | pass@1 (ours) | stored verdict | answered | truncated | trigger rate "
        "| # parallel | # parallel (triggered) |"
    )
    rows = [head, "|" + "---|" * 9]
    for s in [*result["sets"], result["total"]]:
        rows.append(
            f"| {s['set']} | {s['n']} | {_pct(s['accuracy'])} ({s['correct']}) "
            f"| {_pct(s['stored_accuracy'])} ({s['stored_correct']}) | {s['answered']} "
            f"| {s['truncated']} | {_pct(s['trigger_rate'])} | {_num(s['parallel_degree'])} "
            f"| {_num(s['parallel_degree_triggered'])} |"
        )
    rows.append(f"\ntokens counted with: {result['tokenizer']}")
    return "\n".join(rows)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
