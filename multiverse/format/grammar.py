"""The Multiverse text format: tags, tree, parser, validator, tolerant reader, flatten.

This is the ONE grammar module of the project (SPEC.md section 1); the curator, the trainer,
the engine and ``multiverse inspect`` all use it. The token-level layout rule (positions and
masks, SPEC section 3) lives beside it in :mod:`multiverse.format.layout` and shares :data:`TAGS`.

Invariants:
  * ``serialize(parse(text)) == text`` for canonical text (one tag per line, no indentation,
    labels written ``N: ``, exactly one ``\\n`` between structural tags).
  * ``parse`` (strict) raises :class:`MultiverseSyntaxError` listing every violation;
    ``validate`` returns the same list; ``read`` never raises and recovers what it can.
  * Line and column numbers in issues are 1-based and point at the offending tag or text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

from multiverse.format.prompts import (  # noqa: F401 (public names)
    ANSWER_PREFIX,
    PROMPT_SUFFIX_PARALLEL,
    PROMPT_SUFFIX_SEQUENTIAL,
)

TAGS: tuple[str, ...] = (
    "<Think>", "</Think>", "<Parallel>", "</Parallel>", "<Goal>", "</Goal>",
    "<Outline>", "</Outline>", "<Path>", "</Path>", "<Conclusion>", "</Conclusion>",
)  # fmt: skip
"""The twelve tags, in the order they are added to a tokenizer (SPEC 1.1)."""

TAG_NAMES: tuple[str, ...] = ("Think", "Parallel", "Goal", "Outline", "Path", "Conclusion")
CUE = "Let's think in parallel."

_TAG_RE = re.compile(r"<(/?)(think|parallel|goal|outline|path|conclusion)>", re.IGNORECASE)
_CANON = {n.lower(): n for n in TAG_NAMES}
_LABEL_RE = re.compile(r"^(\d+(?:\.\d+)*)\s*: ?")
_CUE_RE = re.compile(r"^\s*let'?s think in parallel\.?\s*$", re.IGNORECASE)


# ----------------------------------------------------------------------------- the tree


@dataclass(slots=True)
class Outline:
    """One ``<Outline>`` of a Goal: ``label`` like ``"2"`` or ``"1.2"`` (None if unlabelled)."""

    label: str | None
    text: str


@dataclass(slots=True)
class Path:
    """One ``<Path>``: its label and body (text pieces and nested blocks, raw, in order)."""

    label: str | None
    body: list[Item] = field(default_factory=list)

    @property
    def blocks(self) -> list[Block]:
        return [b for b in self.body if isinstance(b, Block)]


@dataclass(slots=True)
class Block:
    """One ``<Parallel>`` block: Goal outlines, sibling paths, the Conclusion text."""

    outlines: list[Outline] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    conclusion: str | None = ""
    line: int = 0  # where its <Parallel> was read (0 for blocks built in code)
    col: int = 0
    closed: bool = True  # False when the reader hit the end inside it

    def iter_blocks(self, depth: int = 1) -> Iterable[tuple[int, Block]]:
        yield depth, self
        for p in self.paths:
            for b in p.blocks:
                yield from b.iter_blocks(depth + 1)


Item = Union[str, Block]


@dataclass(slots=True)
class Document:
    """A whole chain: ``before`` + ``<Think>`` + body + ``</Think>`` + ``after``.

    ``has_think`` is False for text without a ``<Think>`` tag (a bare chain); ``think_closed``
    False when the text ended inside ``<Think>`` (truncated output).
    """

    body: list[Item] = field(default_factory=list)
    before: str = ""
    after: str = ""
    has_think: bool = True
    think_closed: bool = True

    @property
    def blocks(self) -> list[Block]:
        return [b for b in self.body if isinstance(b, Block)]

    def iter_blocks(self) -> Iterable[tuple[int, Block]]:
        """Every block with its nesting depth (1 = top level), in document order."""
        for b in self.blocks:
            yield from b.iter_blocks(1)

    @property
    def answer(self) -> str:
        """The text after ``</Think>`` with a leading ``Answer:`` removed."""
        text = self.after.strip()
        return re.sub(r"^answer:\s*", "", text, flags=re.IGNORECASE)


# ----------------------------------------------------------------------------- issues


@dataclass(slots=True, frozen=True)
class Issue:
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line} col {self.col}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "col": self.col, "message": self.message}


class MultiverseSyntaxError(ValueError):
    """Raised by :func:`parse` on text that breaks SPEC 1.2; ``.issues`` lists every violation."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        head = "; ".join(str(i) for i in issues[:5])
        more = f" (+{len(issues) - 5} more)" if len(issues) > 5 else ""
        super().__init__(f"{len(issues)} Multiverse format violation(s): {head}{more}")


# ----------------------------------------------------------------------------- lexer


@dataclass(slots=True)
class _Tok:
    kind: str  # "text" | "tag"
    text: str  # raw text
    offset: int
    name: str = ""  # canonical tag name, e.g. "Path"
    closing: bool = False

    @property
    def tag(self) -> str:
        return f"<{'/' if self.closing else ''}{self.name}>"


def _lex(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    for m in _TAG_RE.finditer(text):
        if m.start() > pos:
            toks.append(_Tok("text", text[pos : m.start()], pos))
        toks.append(_Tok("tag", m.group(0), m.start(), _CANON[m.group(2).lower()], m.group(1) == "/"))
        pos = m.end()
    if pos < len(text):
        toks.append(_Tok("text", text[pos:], pos))
    return toks


class _LineIndex:
    def __init__(self, text: str):
        self.starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]

    def at(self, offset: int) -> tuple[int, int]:
        import bisect

        line = bisect.bisect_right(self.starts, offset)
        return line, offset - self.starts[line - 1] + 1


# ----------------------------------------------------------------------------- parser


class _Parser:
    """Recursive descent over the lexed stream; always recovers, always records issues."""

    def __init__(self, text: str):
        self.text = text
        self.toks = _lex(text)
        self.i = 0
        self.lines = _LineIndex(text)
        self.issues: list[Issue] = []
        self.path_depth = 0

    # helpers -----------------------------------------------------------------
    def _issue(self, tok_or_offset: _Tok | int, message: str) -> None:
        off = tok_or_offset.offset if isinstance(tok_or_offset, _Tok) else tok_or_offset
        line, col = self.lines.at(off)
        self.issues.append(Issue(line, col, message))

    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _next(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        if tok.kind == "tag" and tok.text != tok.tag:
            self._issue(tok, f"tag {tok.text} is not written exactly as {tok.tag}")
        return tok

    def _where(self, tok: _Tok) -> str:
        line, col = self.lines.at(tok.offset)
        return f"line {line} col {col}"

    # document ----------------------------------------------------------------
    def document(self) -> Document:
        doc = Document()
        start = next(
            (k for k, t in enumerate(self.toks) if t.kind == "tag" and t.name == "Think"), None
        )
        if start is None or self.toks[start].closing:
            doc.has_think = False
            if any(t.kind == "tag" for t in self.toks):
                tok = next(t for t in self.toks if t.kind == "tag")
                self._issue(tok, "no <Think> before the first tag")
            doc.body = self.items("Think", None)
            doc.think_closed = True
            return doc
        doc.before = "".join(t.text for t in self.toks[:start])
        self.i = start
        think = self._next()
        doc.body = self.items("Think", think)
        doc.think_closed = self._closed
        rest = self.toks[self.i :]
        for t in rest:
            if t.kind == "tag":
                self._issue(t, f"{t.text} after </Think>")
        doc.after = "".join(t.text for t in rest)
        self.i = len(self.toks)
        return doc

    def items(self, context: str, opener: _Tok | None) -> list[Item]:
        """Text and blocks until ``</context>``; sets ``self._closed``."""
        out: list[Item] = []
        self._closed = False
        while (tok := self._peek()) is not None:
            if tok.kind == "text":
                self.i += 1
                _append_text(out, tok.text)
                continue
            if tok.closing and tok.name == context:
                self._next()
                self._closed = True
                return out
            if not tok.closing and tok.name == "Parallel":
                self._next()
                out.append(self.block(tok))
                continue
            if context == "Path" and (tok.tag in ("<Path>", "<Conclusion>", "</Parallel>")):
                # the path was never closed: the block around it goes on (engine-cut paths)
                self._issue(tok, f"<Path> opened at {self._where(opener)} is not closed before {tok.text}")
                return out
            self._next()
            if tok.closing and tok.name == "Think" and context == "Path":
                self._issue(tok, "stray </Think> inside a <Path> (ignored)")
            else:
                where = f"<{context}>" if opener is not None or context == "Path" else "the text"
                self._issue(tok, f"unexpected {tok.text} inside {where} (kept as text)")
                _append_text(out, tok.text)
        if opener is not None:
            self._issue(len(self.text), f"text ends inside <{context}> opened at {self._where(opener)}")
        return out

    def leaf(self, opener: _Tok) -> tuple[str, bool]:
        """Plain text until the matching closing tag (Outline / Conclusion)."""
        parts: list[str] = []
        while (tok := self._peek()) is not None:
            if tok.kind == "text":
                self.i += 1
                parts.append(tok.text)
                continue
            if tok.closing and tok.name == opener.name:
                self._next()
                return "".join(parts), True
            if tok.name in ("Parallel", "Goal", "Path", "Outline", "Conclusion") or tok.name == "Think":
                # a structural tag: the leaf was never closed; let the caller see the tag
                self._issue(tok, f"<{opener.name}> opened at {self._where(opener)} is not closed before {tok.text}")
                return "".join(parts), False
        self._issue(len(self.text), f"text ends inside <{opener.name}> opened at {self._where(opener)}")
        return "".join(parts), False

    def block(self, opener: _Tok) -> Block:
        line, col = self.lines.at(opener.offset)
        blk = Block(line=line, col=col, closed=False, conclusion=None)
        goal_seen = False
        goal_tok: _Tok | None = None
        path_toks: list[_Tok] = []
        while (tok := self._peek()) is not None:
            if tok.kind == "text":
                self.i += 1
                if tok.text.strip():
                    self._issue(_first_char(tok), "text outside <Goal>/<Path>/<Conclusion> inside <Parallel> (dropped)")
                continue
            self._next()
            if tok.closing and tok.name == "Parallel":
                blk.closed = True
                break
            if tok.closing:
                self._issue(tok, f"unexpected {tok.text} inside <Parallel> opened at {self._where(opener)}")
                if tok.name == "Think" or (tok.name == "Path" and self.path_depth > 0):
                    # the enclosing context closes: the block was never closed
                    self.i -= 1
                    self._issue(tok, f"<Parallel> opened at {self._where(opener)} is not closed")
                    break
                continue
            if tok.name == "Goal":
                if goal_seen:
                    self._issue(tok, "second <Goal> in one <Parallel>")
                elif blk.paths:
                    self._issue(tok, "<Goal> after a <Path>: the Goal must come first")
                goal_seen = True
                goal_tok = tok
                blk.outlines.extend(self.goal(tok))
            elif tok.name == "Path":
                if not goal_seen:
                    self._issue(tok, "<Path> before the <Goal>")
                if blk.conclusion is not None:
                    self._issue(tok, "<Path> after the <Conclusion>")
                path_toks.append(tok)
                blk.paths.append(self.path(tok))
            elif tok.name == "Conclusion":
                if not blk.paths:
                    self._issue(tok, "<Conclusion> before any <Path>")
                if blk.conclusion is not None:
                    self._issue(tok, "second <Conclusion> in one <Parallel>")
                text, _ = self.leaf(tok)
                blk.conclusion = _strip_nl(text)
            else:
                self._issue(tok, f"unexpected {tok.text} inside <Parallel> (only <Goal>, <Path>, <Conclusion>)")
        else:
            self._issue(len(self.text), f"text ends inside <Parallel> opened at {self._where(opener)}")
        if blk.closed:
            end = self.toks[self.i - 1]
            if not goal_seen:
                self._issue(end, f"<Parallel> opened at {self._where(opener)} has no <Goal>")
            if not blk.paths:
                self._issue(end, f"<Parallel> opened at {self._where(opener)} has no <Path>")
            if blk.conclusion is None:
                self._issue(end, f"<Parallel> opened at {self._where(opener)} has no <Conclusion>")
        if goal_seen and blk.closed:
            self._check_labels(blk, goal_tok, path_toks)
        if blk.conclusion is None and blk.closed:
            blk.conclusion = ""  # reported above; a closed block reads as an empty Conclusion
        return blk

    def _check_labels(self, blk: Block, goal_tok: _Tok | None, path_toks: list[_Tok]) -> None:
        n_out, n_path = len(blk.outlines), len(blk.paths)
        for k, (p, tok) in enumerate(zip(blk.paths, path_toks)):
            if k >= n_out:
                self._issue(tok, f"<Path> {p.label or k + 1} has no matching <Outline> (Goal has {n_out})")
            elif blk.outlines[k].label is not None and p.label is not None and blk.outlines[k].label != p.label:
                self._issue(tok, f"<Path> label {p.label} does not match <Outline> {k + 1} label {blk.outlines[k].label}")
        if n_out > n_path and goal_tok is not None:
            self._issue(goal_tok, f"<Goal> has {n_out} <Outline>s but the block has {n_path} <Path>s")

    def goal(self, opener: _Tok) -> list[Outline]:
        outlines: list[Outline] = []
        while (tok := self._peek()) is not None:
            if tok.kind == "text":
                self.i += 1
                if tok.text.strip():
                    self._issue(_first_char(tok), "text outside <Outline> inside <Goal> (dropped)")
                continue
            if tok.closing and tok.name == "Goal":
                self._next()
                return outlines
            if not tok.closing and tok.name == "Outline":
                self._next()
                text, _ = self.leaf(tok)
                label, body = _split_label(_strip_nl(text))
                outlines.append(Outline(label, body))
                continue
            self._issue(tok, f"<Goal> opened at {self._where(opener)} is not closed before {tok.text}")
            return outlines
        self._issue(len(self.text), f"text ends inside <Goal> opened at {self._where(opener)}")
        return outlines

    def path(self, opener: _Tok) -> Path:
        self.path_depth += 1
        body = self.items("Path", opener)
        self.path_depth -= 1
        label = None
        if body and isinstance(body[0], str):
            first = body[0][1:] if body[0].startswith("\n") else body[0]
            label, rest = _split_label(first)
            body[0] = rest
            if not rest:
                body.pop(0)
        return Path(label, body)


def _first_char(tok: _Tok) -> int:
    return tok.offset + len(tok.text) - len(tok.text.lstrip())


def _append_text(out: list[Item], text: str) -> None:
    if out and isinstance(out[-1], str):
        out[-1] += text
    else:
        out.append(text)


def _strip_nl(text: str) -> str:
    if text.startswith("\n"):
        text = text[1:]
    if text.endswith("\n"):
        text = text[:-1]
    return text


def _split_label(text: str) -> tuple[str | None, str]:
    m = _LABEL_RE.match(text)
    if not m:
        return None, text
    return m.group(1), text[m.end() :]


# ----------------------------------------------------------------------------- public API


def read(text: str) -> tuple[Document, list[Issue]]:
    """Tolerant reader: the structure that can be recovered, plus every issue found.

    Handles real, imperfect outputs: truncation (open elements are closed at the end, blocks
    marked ``closed=False``), lower-cased tags, a stray ``</Think>`` inside a path, text where
    it does not belong (reported and dropped), mismatched Outline/Path counts.
    """
    p = _Parser(text)
    doc = p.document()
    return doc, p.issues


def validate(text: str) -> list[Issue]:
    """Every violation of SPEC 1.2 with line, column and a plain message; ``[]`` when valid."""
    doc, issues = read(text)
    return issues


def parse(text: str) -> Document:
    """Strict parse: raises :class:`MultiverseSyntaxError` listing every violation."""
    doc, issues = read(text)
    if issues:
        raise MultiverseSyntaxError(issues)
    return doc


def serialize(doc: Document) -> str:
    """Canonical text of a tree (inverse of :func:`parse` on canonical text)."""
    inner = _items(doc.body)
    if not doc.has_think:
        return inner
    tail = "</Think>" if doc.think_closed else ""
    return f"{doc.before}<Think>{inner}{tail}{doc.after}"


def serialize_block(blk: Block) -> str:
    out = ["<Parallel>\n<Goal>\n"]
    for o in blk.outlines:
        out.append(f"<Outline>\n{_label(o.label)}{o.text}\n</Outline>\n")
    out.append("</Goal>\n")
    for p in blk.paths:
        out.append(f"<Path>\n{_label(p.label)}{_items(p.body)}</Path>\n")
    out.append(f"<Conclusion>\n{blk.conclusion or ''}\n</Conclusion>\n</Parallel>")
    return "".join(out)


def _label(label: str | None) -> str:
    return f"{label}: " if label is not None else ""


def _items(items: list[Item]) -> str:
    return "".join(x if isinstance(x, str) else serialize_block(x) for x in items)


def flatten(source: str | Document) -> str:
    """The sequential view: tags, Goals, Conclusions, cue lines and path labels removed.

    Returns the remaining non-empty lines, stripped, joined with ``\\n`` (the text after
    ``</Think>`` included), which is what the curator's content check compares.
    """
    doc = read(source)[0] if isinstance(source, str) else source
    lines: list[str] = []

    def walk(items: list[Item]) -> None:
        for x in items:
            if isinstance(x, Block):
                for p in x.paths:
                    walk(p.body)
            else:
                for line in x.split("\n"):
                    if line.strip() and not _CUE_RE.match(line):
                        lines.append(line.strip())

    if doc.before.strip():
        walk([doc.before])
    walk(doc.body)
    walk([doc.after])
    return "\n".join(lines)


def is_cue(line: str) -> bool:
    """True for the cue line (``Let's think in parallel.``) in any casing."""
    return bool(_CUE_RE.match(line))


def outline_labels(goal_text: str) -> list[str]:
    """Labels of the Outlines in the text of one (possibly partial) Goal, in order.

    Used by the engine at a fork: ``goal_text`` is a branch's text from its innermost
    ``<Parallel>`` up to ``</Goal>``. Unlabelled outlines are numbered ``1, 2, ...`` in order
    (prefixed with ``prefix.`` when the others carry a nested prefix).
    """
    labels: list[str] = []
    for m in re.finditer(r"<outline>(.*?)(?:</outline>|(?=<outline>)|$)", goal_text, re.IGNORECASE | re.DOTALL):
        label, _ = _split_label(_strip_nl(m.group(1)).lstrip())
        labels.append(label if label is not None else "")
    prefix = ""
    known = [x for x in labels if x]
    if known and "." in known[0]:
        prefix = known[0].rsplit(".", 1)[0] + "."
    return [x if x else f"{prefix}{k + 1}" for k, x in enumerate(labels)]


# ----------------------------------------------------------------------------- statistics


@dataclass(slots=True)
class Stats:
    blocks: int
    max_depth: int
    paths: list[int]  # paths per block, document order

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "max_depth": self.max_depth, "paths": self.paths}


def stats(doc: Document) -> Stats:
    pairs = list(doc.iter_blocks())
    return Stats(len(pairs), max((d for d, _ in pairs), default=0), [len(b.paths) for _, b in pairs])


# ----------------------------------------------------------------------------- tokenizers

_APPROX_RE = re.compile(r"<(?:/?)(?:Think|Parallel|Goal|Outline|Path|Conclusion)>|\d|[A-Za-z]+|\n|[^\sA-Za-z\d]", re.IGNORECASE)


def approx_tokens(text: str) -> list[str]:
    """The built-in fallback tokenizer ("builtin-regex"): each tag, digit, word, newline and
    punctuation mark is one token. An approximation for statistics when no real tokenizer is
    given; counts are roughly 1.2-1.4x below a BPE vocabulary's on English text."""
    return _APPROX_RE.findall(text)


def tag_of(token: str) -> str | None:
    """The canonical tag a token string stands for (any casing), or None."""
    m = _TAG_RE.fullmatch(token)
    return f"<{m.group(1)}{_CANON[m.group(2).lower()]}>" if m else None


_TOKENIZER_FUNCS = ("add_tags_to_tokenizer", "add_tags_to_model", "tag_ids")


def __getattr__(name: str) -> Any:
    """``grammar.add_tags_to_tokenizer`` / ``add_tags_to_model`` / ``tag_ids`` (documented
    names) live in :mod:`multiverse.format.tokenizer`."""
    if name in _TOKENIZER_FUNCS:
        from multiverse.format import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'multiverse.format.grammar' has no attribute {name!r}")
