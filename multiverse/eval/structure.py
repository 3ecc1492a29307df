"""Branch tree, validation report and statistics of Multiverse text (used by ``multiverse inspect``).

Input: a file of Multiverse text, a JSONL record (fields ``chain``/``text``/``output``/
``response``/``completion`` or chat ``messages``; every line is inspected), a trace file from
``shared/data/traces`` (the assistant part is extracted), ``-`` for stdin, or a directory (a
summary over every ``*.txt``/``*.jsonl`` in it).

Token statistics use ``--tokenizer DIR`` when given, else the built-in fallback
``builtin-regex`` (:func:`multiverse.format.grammar.approx_tokens`: tags, digits, words, newlines and
punctuation marks are one token each), named as such in every report.

Line numbers in reports are lines of the file read: for a trace file or a chat sequence
(where only the assistant part is inspected) they are shifted by the lines before that part
(:attr:`Source.line_offset`); for a JSONL record they count within the record's text.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Any

from multiverse.format import approx
from multiverse.format import grammar as g
from multiverse.format.layout_state import LayoutState
from multiverse.format.tokenizer import add_tags_to_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from multiverse.format.layout import Layout  # imports torch: only for --plot

FALLBACK_TOKENIZER = "builtin-regex (approximate)"


# ----------------------------------------------------------------------------- input


@dataclass(slots=True)
class Source:
    name: str
    text: str  # the Multiverse part (assistant turn)
    line_offset: int = 0  # lines of the file before ``text`` (report lines = file lines)


def extract_assistant(text: str) -> str:
    """The assistant part of a whole chat sequence or a third-party trace file."""
    marker = "<|im_start|>assistant\n"
    if marker in text:
        text = text.split(marker, 1)[1]
    for end in ("提取的答案:", "\n参考答案:", "<|im_end|>"):
        if end in text:
            text = text.split(end, 1)[0]
    return text


def _from_record(rec: dict[str, Any], where: str) -> str:
    for key in ("chain", "text", "output", "response", "completion", "generated_text"):
        if isinstance(rec.get(key), str):
            return rec[key]
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str):
                return m["content"]
    raise ValueError(
        f"{where}: JSON record has no text field (expected one of chain, text, output, response, "
        f"completion, or chat messages with an assistant turn); keys: {sorted(rec)[:10]}"
    )


def load_sources(path: str) -> list[Source]:
    """Read FILE / ``-`` / DIR into the texts to inspect (clear errors on bad input)."""
    if path == "-":
        return _sources_from_text("<stdin>", sys.stdin.read())
    p = FsPath(path)
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.suffix in (".txt", ".jsonl", ".md") and x.is_file())
        if not files:
            raise ValueError(f"{path}: directory has no .txt/.jsonl/.md files")
        out: list[Source] = []
        for f in files:
            out.extend(_sources_from_text(str(f), f.read_text(encoding="utf-8", errors="replace")))
        return out
    if not p.exists():
        raise ValueError(f"{path}: no such file")
    return _sources_from_text(str(p), p.read_text(encoding="utf-8", errors="replace"))


def _sources_from_text(name: str, text: str) -> list[Source]:
    if re.match(r"\s*\{", text):  # JSONL (no stripped copy of a large text)
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}:{n}: not valid JSON ({e.msg} at col {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{name}:{n}: expected a JSON object, got {type(rec).__name__}")
            out.append(Source(f"{name}:{n}", _from_record(rec, f"{name}:{n}")))
        return out
    if "模型解答:" in text or "<|im_start|>assistant" in text:
        head = text[: text.index("模型解答:") + len("模型解答:")] if "模型解答:" in text else ""
        rest = text[len(head) :]
        part = extract_assistant(rest)
        start = len(head) + (rest.find(part) if part else 0)
        return [Source(name, part, text.count("\n", 0, max(start, 0)))]
    return [Source(name, text)]


# ----------------------------------------------------------------------------- tokenizers


class TokenCounter:
    """Turns text into token strings and tags for the layout rule."""

    def __init__(self, tokenizer_dir: str | None = None):
        self.tok = None
        self.name = FALLBACK_TOKENIZER
        if tokenizer_dir:
            if not FsPath(tokenizer_dir).exists():
                raise ValueError(f"--tokenizer {tokenizer_dir}: no such directory")
            try:
                self.tok = load_tokenizer(tokenizer_dir)
            except ImportError as e:  # pragma: no cover - depends on extras
                raise ValueError("--tokenizer needs transformers: pip install 'multiverse[hf]'") from e
            except (OSError, ValueError) as e:
                raise ValueError(f"--tokenizer {tokenizer_dir}: {e}") from None
            self.tag_ids = add_tags_to_tokenizer(self.tok)
            self.by_id = {v: k for k, v in self.tag_ids.items()}
            self.name = f"{tokenizer_dir} ({type(self.tok).__name__})"

    def tags(self, text: str) -> list[str | None]:
        if self.tok is None:
            return [t if t in g.TAGS else None for t in g.approx_tokens(text)]
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.by_id.get(i) for i in ids]

    def count(self, text: str) -> int:
        if self.tok is None:
            return approx.count(text)
        return len(self.tok.encode(text, add_special_tokens=False))

    def runs(self, text: str) -> Iterator[approx.Run]:
        """:meth:`tags` run-length encoded (:func:`multiverse.format.approx.runs`): the built-in
        counter never makes a string per token."""
        if self.tok is None:
            return approx.runs(text)
        return approx.group(self.tags(text))


def layout_extent(runs: Iterable[approx.Run]) -> tuple[int, int]:
    """``(len(layout), layout.depth_tokens(0))`` of :func:`~multiverse.format.layout.layout_tags`
    over the tokens given as runs, with the same rule (:class:`LayoutState`) and no per-token
    tensor or list."""
    state, total, last = LayoutState(), 0, -1
    skip, step = state.skip, state.step
    for tag, n in runs:
        total += n
        pos = skip(n) if tag is None else step(tag)
        if pos > last:
            last = pos
    return total, last + 1


# ----------------------------------------------------------------------------- report


def issue_kind(message: str) -> str:
    """The kind of a validation issue: its message with numbers and labels generalised
    ("<Path> 3 has no matching <Outline> (Goal has 2)" -> "<Path> N has no matching <Outline>
    (Goal has N)"), for counting violations by kind."""
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", message)
    return re.sub(r"\d+(\.\d+)*", "N", kind)


@dataclass(slots=True)
class Report:
    name: str
    doc: g.Document
    issues: list[g.Issue]
    total_tokens: int
    depth_tokens: int  # the layout's sequential depth (max position + 1)
    counter: TokenCounter
    extra: dict[str, Any] = field(default_factory=dict)  # "text": the text read
    line_offset: int = 0  # added to the document's line numbers (file lines)
    _layout: Layout | None = None

    @property
    def tokenizer(self) -> str:
        return self.counter.name

    @property
    def tags(self) -> list[str | None]:
        """Per token, its tag or None (a list as long as the text's tokens: built on demand)."""
        return self.counter.tags(self.extra["text"])

    @property
    def layout(self) -> Layout:
        """Per-token positions and membership (for ``--plot``), built on first use."""
        if self._layout is None:
            from multiverse.format.layout import layout_tags

            self._layout = layout_tags(self.tags)
        return self._layout

    def to_dict(self) -> dict[str, Any]:
        s = g.stats(self.doc)
        total, depth = self.total_tokens, self.depth_tokens
        return {
            "source": self.name,
            "valid": not self.issues,
            "errors": [i.to_dict() for i in self.issues],
            "violation_kinds": dict(Counter(issue_kind(i.message) for i in self.issues)),
            "blocks": s.blocks,
            "max_depth": s.max_depth,
            "paths": s.paths,
            "total_tokens": total,
            "depth_tokens": depth,
            "parallel_degree": round(total / depth, 4) if depth else 1.0,
            "tokenizer": self.tokenizer,
            "truncated": not self.doc.think_closed or any(not b.closed for _, b in self.doc.iter_blocks()),
        }


def inspect_text(
    text: str, counter: TokenCounter | None = None, name: str = "<text>", line_offset: int = 0
) -> Report:
    """Read ``text`` tolerantly and lay it out; issue lines are shifted by ``line_offset``.
    Linear in time; memory: the tree (the per-token layout is built only if asked for)."""
    counter = counter or TokenCounter()
    doc, issues = g.read(text)
    if line_offset:
        issues = [replace(i, line=i.line + line_offset) for i in issues]
    total, depth = layout_extent(counter.runs(text))
    return Report(name, doc, issues, total, depth, counter, {"text": text}, line_offset)


# ----------------------------------------------------------------------------- tree drawing


def _short(text: str, width: int = 60) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 1] + "…"


def draw_tree(
    doc: g.Document, counter: TokenCounter | None = None, width: int = 60, line_offset: int = 0
) -> str:
    """The branch tree as box-drawing text (one line per text run, block, path, conclusion);
    block lines are shifted by ``line_offset`` (file lines)."""
    return "\n".join(tree_lines(doc, counter, width, line_offset))


def tree_lines(
    doc: g.Document, counter: TokenCounter | None = None, width: int = 60, line_offset: int = 0
) -> Iterator[str]:
    """:func:`draw_tree`'s lines, one at a time."""
    counter = counter or TokenCounter()
    yield "<Think>" if doc.has_think else "(no <Think>)"

    def items(body: list[g.Item], prefix: str) -> Iterator[str]:
        for k, x in enumerate(body):
            last = k == len(body) - 1
            branch, cont = ("└─ ", "   ") if last else ("├─ ", "│  ")
            if isinstance(x, str):
                if x.strip():
                    yield f"{prefix}{branch}text ({counter.count(x)} tok): {_short(x, width)}"
                continue
            state = "" if x.closed else " [unclosed]"
            yield f"{prefix}{branch}Parallel: {len(x.paths)} path(s), {len(x.outlines)} outline(s), line {x.line + line_offset}{state}"
            inner = prefix + cont
            for o in x.outlines:
                yield f"{inner}│  goal {o.label or '?'}: {_short(o.text, width - 10)}"
            for j, p in enumerate(x.paths):
                plast = j == len(x.paths) - 1 and x.conclusion is None
                pb, pc = ("└─ ", "   ") if plast else ("├─ ", "│  ")
                ntok = sum(counter.count(t) for t in p.body if isinstance(t, str))
                head = f"{inner}{pb}Path {p.label or j + 1} ({ntok} tok)"
                if all(isinstance(t, str) for t in p.body):  # a leaf path: one line
                    yield f"{head}: {_short(''.join(p.body), width - 10)}"
                else:
                    yield head
                    yield from items(p.body, inner + pc)
            if x.conclusion is not None:
                yield f"{inner}└─ Conclusion: {_short(x.conclusion, width - 14)}"

    yield from items(doc.body, "")
    if doc.has_think:
        yield "</Think>" if doc.think_closed else "(text ends inside <Think>)"
    if doc.after.strip():
        yield f"after: {_short(doc.after, width)}"


def format_report(rep: Report, counter: TokenCounter, max_errors: int = 20) -> str:
    return "\n".join(report_lines(rep, counter, max_errors))


def report_lines(rep: Report, counter: TokenCounter, max_errors: int = 20) -> Iterator[str]:
    """The text report, a line at a time (the tree of a large text is never one string)."""
    d = rep.to_dict()
    yield f"== {rep.name}"
    yield from tree_lines(rep.doc, counter, line_offset=rep.line_offset)
    yield ""
    if rep.issues:
        yield f"INVALID: {len(rep.issues)} issue(s)"
        yield from (f"  {i}" for i in rep.issues[:max_errors])
        if len(rep.issues) > max_errors:
            yield f"  ... {len(rep.issues) - max_errors} more (use --json for all)"
    else:
        yield "valid: yes"
    paths = d["paths"]
    mean = sum(paths) / len(paths) if paths else 0.0
    yield (f"blocks: {d['blocks']}   max depth: {d['max_depth']}   paths per block: "
           f"{paths if len(paths) <= 12 else str(paths[:12])[:-1] + ', ...]'} (mean {mean:.2f})")  # fmt: skip
    yield (f"tokens: {d['total_tokens']} total, {d['depth_tokens']} sequential depth   "
           f"# parallel: {d['parallel_degree']:.3f}   truncated: {'yes' if d['truncated'] else 'no'}")  # fmt: skip
    yield f"tokenizer: {d['tokenizer']}"


def summarize(reports: list[Report]) -> dict[str, Any]:
    ds = [r.to_dict() for r in reports]
    kinds: Counter[str] = Counter()
    files_with: Counter[str] = Counter()
    for d in ds:
        kinds.update(d["violation_kinds"])
        files_with.update(d["violation_kinds"].keys())
    with_par = [d for d in ds if d["blocks"]]
    return {
        "files": len(ds),
        "valid": sum(d["valid"] for d in ds),
        "with_parallel": len(with_par),
        "mean_parallel_degree": round(sum(d["parallel_degree"] for d in ds) / max(len(ds), 1), 4),
        "mean_parallel_degree_with_blocks": round(
            sum(d["parallel_degree"] for d in with_par) / max(len(with_par), 1), 4
        ),
        "blocks": sum(d["blocks"] for d in ds),
        "truncated": sum(d["truncated"] for d in ds),
        "tokenizer": ds[0]["tokenizer"] if ds else FALLBACK_TOKENIZER,
        "violation_kinds": dict(kinds.most_common()),
        "files_with_violation": dict(files_with.most_common()),
    }
