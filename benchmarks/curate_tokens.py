"""Benchmark (not a test): the tokens the curating LLM is asked to WRITE per token of chain, on
long real chains (goal <= 0.3x), and ``curate eval`` on them end to end.

The real Multiverse-32B outputs (``shared/data/traces/multiverse-32b``: the valid, closed traces
with at least one block, :func:`multiverse.curate.evaluate.ground_truth`) are flattened to
sequential chains and curated through the test suite's scripted stand-in for a REMOTE LLM
(``tests/curate/curate_standin.py``, a real HTTP server on 127.0.0.1). The stand-in answers
as a perfect LLM would, from the trace's known structure: the step tree over the curator's
units, the groups, and per block the trace's own Outlines and Conclusion (step summaries: the
path's Outline, or the first ten words of a stretch of plain text; no edits).

Counted: every reply in the run's journal (what the LLM wrote) against the flattened chains,
with the Qwen2.5 (Multiverse-32B) tokenizer when the ``qwen`` extra is installed, else the
built-in regex counter (named in the output); split by step and into free text (summaries,
reasons, outlines, conclusions, edit strings) vs the rest (JSON keys, numbers, punctuation).

    .venv/bin/python benchmarks/curate_tokens.py [--traces DIR] [--n 20]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "curate"))  # the stand-in LLM

from curate_standin import StandIn  # noqa: E402

from multiverse.curate import evaluate as E  # noqa: E402
from multiverse.curate import journal as J  # noqa: E402
from multiverse.curate import prompts  # noqa: E402
from multiverse.curate.pipeline import RunConfig, run_sync  # noqa: E402
from multiverse.format import grammar  # noqa: E402

MODEL = "standin-for-remote-llm (perfect replies from the trace's structure)"


def counter() -> tuple[object, str]:
    try:
        from multiverse.format.tokenizer import load_tokenizer

        tok = load_tokenizer("qwen2.5")
        return (lambda text: len(tok.encode(text, add_special_tokens=False))), "qwen2.5 (Multiverse-32B)"
    except (ImportError, OSError, ValueError):
        return (lambda text: len(grammar.approx_tokens(text))), "builtin-regex (approximate)"


def free_text(step: str, reply: str) -> list[str]:
    """The free-text strings of one reply (what is not JSON structure)."""
    try:
        data = json.loads(reply)
    except json.JSONDecodeError:
        return []
    if step == "mapreduce":
        edits = [x for e in data.get("edits", []) for x in (e.get("find", ""), e.get("replace", ""))]
        return [*(data.get("outlines") or []), data.get("conclusion", ""), *edits]
    if step == "parallelise":
        return [g.get("reason", "") for g in data.get("groups", []) if isinstance(g, dict)]  # v2: no reason
    out: list[str] = []

    def walk(steps: list) -> None:
        for s in steps:  # v2 [first, last, "summary"(, [sub-steps])] or v1 {"summary", "substeps"}
            if isinstance(s, list):
                out.append(s[2])
                walk(s[3] if len(s) > 3 else [])
            else:
                out.append(s.get("summary", ""))
                walk(s.get("substeps") or [])

    walk(data.get("steps", []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=str(ROOT.parent / "shared" / "data" / "traces" / "multiverse-32b"))
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    truth = E.ground_truth(args.traces, args.n)
    count, tok_name = counter()
    standin = StandIn([types.SimpleNamespace(question=t["question"], chain=t["chain"]) for t in truth])
    url = standin.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            s = run_sync(RunConfig(output=out, base_url=url, model=MODEL, concurrency=4), E.inputs_of(truth))
            result = E.score(truth, out)
            journal = J.read_jsonl(out / "journal.jsonl")
    finally:
        standin.stop()
    chain_tokens = sum(count(grammar.flatten(t["chain"])) for t in truth)
    by_step: dict[str, int] = defaultdict(int)
    text_by_step: dict[str, int] = defaultdict(int)
    by_record: dict[str, int] = defaultdict(int)
    for e in journal:
        n = count(e["reply"])
        by_step[e["step"]] += n
        by_record[e["record"]] += n
        text_by_step[e["step"]] += sum(count(x) for x in free_text(e["step"], e["reply"]))
    written = sum(by_step.values())
    lengths = {t["id"]: count(grammar.flatten(t["chain"])) for t in truth}
    ratios = sorted(by_record[i] / n for i, n in lengths.items())
    by_length: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # traces, written, chain tokens
    for i, n in lengths.items():
        name = "<2000" if n < 2000 else "2000-5000" if n < 5000 else ">=5000"
        for k, v in enumerate((1, by_record[i], n)):
            by_length[name][k] += v
    print(json.dumps({
        "traces": len(truth), "accepted": s.accepted, "requests": s.requests, "model": MODEL,
        "tokenizer": tok_name, "chain_tokens": chain_tokens, "chain_tokens_per_trace": round(chain_tokens / len(truth)),
        "llm_output_tokens": written,
        "llm_output_tokens_per_chain_token": round(written / chain_tokens, 4),
        "per_trace": {"min": round(ratios[0], 4), "median": round(ratios[len(ratios) // 2], 4), "max": round(ratios[-1], 4)},
        "by_chain_length": {k: {"traces": v[0], "per_chain_token": round(v[1] / v[2], 4)} for k, v in sorted(by_length.items())},
        "by_step": {k: {"tokens": v, "free_text": text_by_step[k], "structure": v - text_by_step[k],
                        "per_chain_token": round(v / chain_tokens, 4)} for k, v in sorted(by_step.items())},
        "prompt_versions": prompts.versions(),
        "eval": {k: result[k] for k in ("records", "accepted", "exact", "block_f1", "path_f1", "trigger_rate",
                                        "parallel_degree")},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
