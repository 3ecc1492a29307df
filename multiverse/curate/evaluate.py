"""``multiverse curate eval``: score a curator configuration (endpoint, model, prompts) against
ground truth whose parallel form is known.

Ground truth: the synthetic tasks (:mod:`multiverse.eval.tasks`, test split; an exact parallel
form by construction) or real Multiverse outputs (a traces directory such as
``shared/data/traces/multiverse-32b``: only the valid, closed traces with at least one block).
Each chain is flattened (:func:`multiverse.format.grammar.flatten`), curated by a normal run,
and the curated text is compared with the original:

* block and path **boundary F1**: a boundary is the offset, in the flattened text with all
  whitespace removed, where a block (or a path) starts; micro-averaged over records, a
  rejected record predicting no boundary;
* **trigger rate** (share with at least one block) and **# parallel** (SPEC 2, the layout rule,
  :func:`multiverse.eval.structure.inspect_text`) of the curated vs the original texts.
"""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path
from typing import Any

from multiverse.curate.inputs import InputRecord
from multiverse.curate.journal import read_jsonl
from multiverse.format import grammar


def ground_truth(source: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``[{id, question, chain, answer}]``: ``source`` is ``"tasks"`` or a traces directory."""
    if source == "tasks":
        from multiverse.eval import tasks

        recs = itertools.islice(tasks.iter_records(seed, "test"), n)
        return [{"id": r.id, "question": r.question, "chain": r.chain, "answer": str(r.answer)} for r in recs]
    from multiverse.eval.structure import extract_assistant
    from multiverse.eval.traces import parse_trace

    out: list[dict[str, str]] = []
    for path in sorted(Path(source).rglob("*.txt")):
        try:
            trace = parse_trace(path)
        except ValueError:
            continue
        text = extract_assistant(trace.sequence)
        end = text.lower().find("</think>")
        chain = text[: end + len("</think>")] if end >= 0 else text
        doc, issues = grammar.read(chain)
        if issues or not doc.blocks or not doc.think_closed:
            continue
        rel = path.relative_to(source).with_suffix("")
        out.append({"id": f"trace-{rel.as_posix().replace('/', '-')}", "question": trace.question,
                    "chain": chain, "answer": trace.reference})  # fmt: skip
        if len(out) >= n:
            break
    return out


def inputs_of(truth: list[dict[str, str]]) -> list[InputRecord]:
    return [InputRecord(t["id"], t["question"], grammar.flatten(t["chain"]), t["answer"], "eval") for t in truth]


def marks(text: str) -> tuple[str, set[int], set[int]]:
    """(flattened text without whitespace, block start offsets, path start offsets)."""
    doc = grammar.read(text)[0]
    buf: list[str] = []
    blocks: set[int] = set()
    paths: set[int] = set()
    pos = 0

    def walk(items: list[grammar.Item]) -> None:
        nonlocal pos
        for x in items:
            if isinstance(x, grammar.Block):
                blocks.add(pos)
                for p in x.paths:
                    paths.add(pos)
                    walk(p.body)
                continue
            for line in x.split("\n"):
                if line.strip() and not grammar.is_cue(line):
                    s = "".join(line.split())
                    buf.append(s)
                    pos += len(s)

    walk(doc.body)
    return "".join(buf), blocks, paths


def _mapped(offsets: set[int], src: str, dst: str) -> set[int]:
    """Offsets in ``src`` carried over to ``dst`` (equal texts: unchanged): inside an equal span
    by its shift; at the start of an edited span (an edit at a path's opening, "Alternatively,
    if" -> "If") to the start of the text it replaced; elsewhere inside an edit: dropped."""
    if src == dst:
        return set(offsets)
    sm = difflib.SequenceMatcher(None, src, dst, autojunk=False)
    out = set()
    ops = sm.get_opcodes()
    for o in offsets:
        for tag, i1, i2, j1, _ in ops:
            if (tag == "equal" and i1 <= o < i2) or o == i1:
                out.add(j1 + (o - i1))
                break
        else:
            if o == len(src):
                out.add(len(dst))
    return out


def _f1(tp: int, n_pred: int, n_gold: int) -> float:
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 1.0


def score(truth: list[dict[str, str]], output: Path) -> dict[str, Any]:
    """Compare ``output/curated.jsonl`` with the ground truth (see the module docstring)."""
    from multiverse.eval.structure import inspect_text

    curated = {r["id"]: r for r in read_jsonl(output / "curated.jsonl")}
    tp = {"block": 0, "path": 0}
    n_pred = {"block": 0, "path": 0}
    n_gold = {"block": 0, "path": 0}
    par_gold, par_cur, trig_gold, trig_cur, exact = [], [], 0, 0, 0
    for t in truth:
        g_text, g_blocks, g_paths = marks(t["chain"])
        gold_rep = inspect_text(t["chain"]).to_dict()
        par_gold.append(gold_rep["parallel_degree"])
        trig_gold += gold_rep["blocks"] > 0
        n_gold["block"] += len(g_blocks)
        n_gold["path"] += len(g_paths)
        row = curated.get(t["id"])
        if row is None:
            continue
        c_text, c_blocks, c_paths = marks(row["chain"])
        rep = inspect_text(row["chain"]).to_dict()
        par_cur.append(rep["parallel_degree"])
        trig_cur += rep["blocks"] > 0
        exact += row["chain"] == t["chain"]
        for kind, pred, gold in (("block", c_blocks, g_blocks), ("path", c_paths, g_paths)):
            pred = _mapped(pred, c_text, g_text)
            n_pred[kind] += len(pred)
            tp[kind] += len(pred & gold)
    n = len(truth)
    ids = {t["id"] for t in truth}
    journal = [e for e in read_jsonl(output / "journal.jsonl") if e.get("record") in ids]
    written = sum(int((e.get("usage") or [0, 0])[1]) for e in journal)
    replies = sum(len(grammar.approx_tokens(str(e.get("reply", "")))) for e in journal)  # one counter for
    chain_tokens = sum(len(grammar.approx_tokens(grammar.flatten(t["chain"]))) for t in truth)  # both sides

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None  # None: no record (not a degree of 0)

    return {
        "records": n,
        "accepted": len([t for t in truth if t["id"] in curated]),
        "exact": exact,
        "block_f1": round(_f1(tp["block"], n_pred["block"], n_gold["block"]), 4),
        "path_f1": round(_f1(tp["path"], n_pred["path"], n_gold["path"]), 4),
        "trigger_rate": {"original": round(trig_gold / n, 4) if n else 0.0,
                         "curated": round(trig_cur / n, 4) if n else 0.0},  # fmt: skip
        "parallel_degree": {"original": mean(par_gold), "curated_accepted": mean(par_cur)},
        "tokenizer": "builtin-regex (approximate)",
        # every finished request of these records in the journal (resumed runs included)
        "llm_requests": len(journal),
        "llm_output_tokens": written,  # completion tokens as the endpoint reported them
        # the replies' tokens per token of the flattened chains, both counted with the builtin counter
        "llm_output_tokens_per_chain_token": round(replies / chain_tokens, 4) if chain_tokens else 0.0,
    }


HEADER = ("| curating LLM | ground truth | records | accepted | exact | block F1 | path F1 | trigger (orig / cur) "
          "| # parallel (orig / cur) | LLM output tokens (per chain token) | wall s |\n|" + "---|" * 11)


def row(result: dict[str, Any], name: str) -> str:
    """One table row of a :func:`score` result (with ``model`` and ``wall_s`` added)."""
    t, p = result["trigger_rate"], result["parallel_degree"]
    return (f"| {result.get('model', '')} | {name} | {result['records']} | {result['accepted']} | {result['exact']} | "
            f"{result['block_f1']} | {result['path_f1']} | {t['original']} / {t['curated']} | "
            f"{p['original']} / {'-' if p['curated_accepted'] is None else p['curated_accepted']} | "
            f"{result.get('llm_output_tokens', 0)} "
            f"({result.get('llm_output_tokens_per_chain_token', 0.0)}) | {result.get('wall_s', '')} |")  # fmt: skip


def table(result: dict[str, Any], name: str) -> str:
    return HEADER + "\n" + row(result, name)
