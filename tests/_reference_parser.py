"""The parser as it was before the streaming rewrite (commit f29112a), frozen: the oracle of
tests/format/test_parser_parity.py. It lexes the whole text into a token list and indexes every
line start (memory and time a few times the text); :mod:`multiverse.format.parser` must give
the same tree and the same issues, in the same order, on any text.

Two fixes are carried over, each with its own test in tests/format/test_grammar.py: ``items``
clears ``_closed`` when its element is not closed (a nested path's close no longer reads as
``</Think>``), and ``_TAG_RE`` folds case in ASCII only (``<concluſion>`` raised KeyError).
"""

from __future__ import annotations

from dataclasses import dataclass

from multiverse.format.document import (
    _CANON,
    _LABEL_RE,
    _TAG_RE,
    Block,
    Document,
    Issue,
    Item,
    Outline,
    PathNode,
    unique_labels,
)


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
                self._closed = False
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
        self._closed = False
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
        want = unique_labels([o.label for o in blk.outlines])  # a repeated label is renumbered
        for k, (p, tok) in enumerate(zip(blk.paths, path_toks)):
            if k >= n_out:
                self._issue(tok, f"<Path> {p.label or k + 1} has no matching <Outline> (Goal has {n_out})")
            elif blk.outlines[k].label is not None and p.label is not None and want[k] != p.label:
                again = "" if want[k] == blk.outlines[k].label else f" ({blk.outlines[k].label} is repeated)"
                self._issue(tok, f"<Path> label {p.label} does not match <Outline> {k + 1} label {want[k]}{again}")
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

    def path(self, opener: _Tok) -> PathNode:
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
        return PathNode(label, body)


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




def read(text: str) -> tuple[Document, list[Issue]]:
    """``grammar.read`` as it was."""
    p = _Parser(text)
    doc = p.document()
    return doc, p.issues
