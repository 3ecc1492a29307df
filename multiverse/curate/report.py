"""``multiverse curate report DIR``: what a run produced, as Markdown and JSON.

Read from ``DIR/curated.jsonl``, ``DIR/rejected.jsonl`` and ``DIR/run.json`` (the last run's
counters): counts (accepted / rejected / pending), the pass rate of every check over all
attempts, the top failure reasons (digits folded so similar reasons group) with one example
record each, the edit-distance distribution around the threshold, attempts per record, the
structure of the accepted data (trigger rate, blocks per record, paths per block, depth), and
# parallel (SPEC 2, builtin-regex tokens), requests, retries, tokens (total and per accepted
record) and cost; ``report.png`` (distance histogram, # parallel per record) when matplotlib
is installed. Pure: no LLM, no network.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from multiverse.curate.journal import read_jsonl
from multiverse.format import grammar

DISTANCE_BINS = (0.0, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def _fold(reason: str) -> str:
    return re.sub(r"\d+(?:\.\d+)?", "N", reason)[:160]


def _bins(values: list[float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for lo, hi in zip(DISTANCE_BINS, DISTANCE_BINS[1:], strict=False):
        out[f"({lo}, {hi}]" if lo else f"[0, {hi}]"] = sum(1 for v in values if (lo < v or lo == 0) and v <= hi)
    return out


def build(directory: str | Path, counter: Any = None) -> dict[str, Any]:
    """The report of the run in ``directory``; ``counter``: the
    :class:`multiverse.eval.structure.TokenCounter` of # parallel (default: the built-in
    approximate one)."""
    d = Path(directory)
    good = read_jsonl(d / "curated.jsonl")
    bad = read_jsonl(d / "rejected.jsonl")
    run = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    inputs = run.get("inputs", len(good) + len(bad))
    checks: Counter[str] = Counter()
    passed: Counter[str] = Counter()
    distances: list[float] = []
    reasons: Counter[str] = Counter()
    example: dict[str, str] = {}
    for row in good + bad:
        for a in row.get("curation", {}).get("attempt_log", []):
            for name in ("grammar", "content", "style"):
                if name in a:
                    checks[name] += 1
                    passed[name] += bool(a[name])
            if "distance" in a:
                distances.append(float(a["distance"]))
    for row in bad:
        for r in row.get("reasons", []):
            key = _fold(r)
            reasons[key] += 1
            example.setdefault(key, str(row.get("id")))
    from multiverse.eval.structure import TokenCounter, inspect_text

    counter = counter or TokenCounter()
    blocks, paths, depths, triggered, parallel = [], [], [], 0, []
    for row in good:
        rep = inspect_text(row["chain"], counter)
        parallel.append(rep.to_dict()["parallel_degree"])
        st = grammar.stats(rep.doc)
        blocks.append(st.blocks)
        paths.extend(st.paths)
        depths.append(st.max_depth)
        triggered += st.blocks > 0
    n_good = len(good)
    tokens = (run.get("prompt_tokens", 0), run.get("completion_tokens", 0))
    return {
        "directory": str(d),
        "model": run.get("model", ""),
        "threshold": run.get("threshold", 0.2),
        "counts": {"inputs": inputs, "accepted": n_good, "rejected": len(bad),
                   "pending": max(0, inputs - n_good - len(bad))},  # fmt: skip
        "pass_rate": {k: round(passed[k] / checks[k], 4) for k in sorted(checks)},
        "top_failure_reasons": [{"reason": r, "count": c, "example_id": example[r]} for r, c in reasons.most_common(10)],
        "distance_histogram": _bins(distances),
        "attempts_per_record": dict(sorted(Counter(r.get("curation", {}).get("attempts", 0) for r in good + bad).items())),
        "structure": {
            "trigger_rate": round(triggered / n_good, 4) if n_good else 0.0,
            "blocks_per_record": round(sum(blocks) / n_good, 3) if n_good else 0.0,
            "paths_per_block": round(sum(paths) / len(paths), 3) if paths else 0.0,
            "max_depth": max(depths, default=0),
            "parallel_degree_mean": round(sum(parallel) / len(parallel), 4) if parallel else 0.0,
            "parallel_tokenizer": counter.name,
        },
        "parallel_degree_per_record": parallel,
        "distances": distances,
        "requests": {k: run.get(k, 0) for k in ("requests", "completions", "cached_requests", "retries")},
        "retry_reasons": run.get("retry_reasons", {}),
        "tokens": {"prompt": tokens[0], "completion": tokens[1],
                   "per_accepted_record": round(sum(tokens) / n_good, 1) if n_good else None},  # fmt: skip
        "cost": run.get("cost", 0.0),
        "wall_s": run.get("wall_s", 0.0),
        "stopped": run.get("stopped", ""),
    }


def markdown(rep: dict[str, Any]) -> str:
    c = rep["counts"]
    lines = [f"# Curation report: {rep['directory']}", "", f"model: `{rep['model']}`", "",
             "| inputs | accepted | rejected | pending |", "|---|---|---|---|",
             f"| {c['inputs']} | {c['accepted']} | {c['rejected']} | {c['pending']} |", "",
             "## Checks (pass rate over all attempts)", ""]  # fmt: skip
    lines += [f"- {k}: {v:.1%}" for k, v in rep["pass_rate"].items()] or ["- (no attempt reached the checks)"]
    lines += ["", "## Top failure reasons", ""]
    lines += [f"- {r['count']} x {r['reason']} (e.g. `{r['example_id']}`)" for r in rep["top_failure_reasons"]] or ["- none"]
    lines += ["", "## Edit distance (all attempts)", "", "| range | attempts |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rep["distance_histogram"].items()]
    s, t, q = rep["structure"], rep["tokens"], rep["requests"]
    lines += ["", "## Accepted data", "", f"- trigger rate {s['trigger_rate']:.1%}, blocks per record "
              f"{s['blocks_per_record']}, paths per block {s['paths_per_block']}, max depth {s['max_depth']}, "
              f"# parallel {s['parallel_degree_mean']} ({s['parallel_tokenizer']})",
              f"- attempts per record: {rep['attempts_per_record']}", "", "## Cost", "",
              f"- requests {q['requests']} (completions {q['completions']}, from the journal {q['cached_requests']}, "
              f"retries {q['retries']} {rep['retry_reasons']})",
              f"- tokens: prompt {t['prompt']}, completion {t['completion']}, per accepted record "
              f"{'-' if t['per_accepted_record'] is None else t['per_accepted_record']}; cost ${rep['cost']}",
              f"- wall time {rep['wall_s']} s" + (f"; stopped: {rep['stopped']}" if rep["stopped"] else ""), ""]  # fmt: skip
    return "\n".join(lines)


def picture(rep: dict[str, Any], path: Path, threshold: float = 0.2) -> bool:
    """``report.png``: the edit-distance histogram (threshold marked) and # parallel per
    accepted record. False (and nothing written) when matplotlib (extra ``viz``) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.hist(rep["distances"] or [0.0], bins=40, range=(0.0, 1.0), color="#4a7ab5")
    ax1.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold}")
    ax1.set(title="edit distance (all attempts)", xlabel="normalised edit distance", ylabel="attempts")
    ax1.legend()
    ax2.plot(range(1, len(rep["parallel_degree_per_record"]) + 1), rep["parallel_degree_per_record"], ".", color="#2e8b57")
    ax2.set(title="# parallel per accepted record", xlabel="record", ylabel="# parallel (builtin-regex)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(directory: str | Path, counter: Any = None) -> dict[str, Any]:
    """Build the report (:func:`build`) and write ``report.json``, ``report.md`` and (with
    matplotlib) ``report.png`` into ``directory``."""
    rep = build(directory, counter)
    d = Path(directory)
    (d / "report.json").write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
    (d / "report.md").write_text(markdown(rep), encoding="utf-8")
    picture(rep, d / "report.png", rep["threshold"])
    return rep
