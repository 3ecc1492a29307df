"""The parser behind :func:`multiverse.format.grammar.read` / ``validate`` / ``parse``.

A lexer (tags in any casing, text between them) and a recursive-descent parser over the token
stream that always recovers: open elements are closed at the end of the text, text where it
does not belong is reported and dropped, and every violation becomes an :class:`Issue` with a
1-based line and column pointing at the offending tag or text.

Linear in time, and in memory only the tree: the lexer is a generator over the tag matches that
the parser reads with one token of lookahead (no token list), and a token's line and column are
counted as the scan moves forward (``str.count`` over the gap since the previous token; no
per-character Python work, no line index). Text pieces are joined once, never grown by ``+=``.
The list-based parser this replaced is kept as the oracle of a parity test over random and
malformed documents (tests/_reference_parser.py, tests/format/test_parser_parity.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Union

from multiverse.format.document import (
    _CANON,
    _LABEL_RE,
    _TAG_RE,
    TAGS,
    Block,
    Document,
    Issue,
    Item,
    Outline,
    PathNode,
    unique_labels,
)

_EXACT = frozenset(TAGS)
_THINK_RE = re.compile(r"<(/?)think>", _TAG_RE.flags)  # the first Think tag, same case rule

_ENDS_PATH = {("Path", False), ("Conclusion", False), ("Parallel", True)}  # <Path> <Conclusion> </Parallel>
Where = tuple[int, int]  # (line, column), 1-based


class _Tok:
    """A tag: ``name`` canonical (e.g. "Path"), ``exact`` when written as in TAGS, ``line``/
    ``col`` of its ``<``. (The text between two tags is a plain ``str`` token.)"""

    __slots__ = ("text", "offset", "line", "col", "name", "closing", "exact")

    def __init__(self, text: str, offset: int, line: int, col: int, name: str, closing: bool,
                 exact: bool) -> None:  # fmt: skip
        self.text, self.offset, self.line, self.col = text, offset, line, col
        self.name, self.closing, self.exact = name, closing, exact

    def end(self) -> tuple[int, int, int]:
        """(offset, line, column) just after the tag (a tag holds no newline)."""
        return self.offset + len(self.text), self.line, self.col + len(self.text)

    @property
    def tag(self) -> str:
        return f"<{'/' if self.closing else ''}{self.name}>"


def _line_col(text: str, offset: int) -> Where:
    return text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)


Token = Union[_Tok, str]


def _lex(text: str, start: int) -> Iterator[Token]:
    """The tokens from ``start`` on: tags, and the text between them as ``str``. Lines are
    counted over each gap between tags (a tag holds no newline): one pass of ``str.count``."""
    line, col0 = _line_col(text, start)
    line_start = start - col0 + 1
    count, rfind = text.count, text.rfind
    kinds: dict[str, tuple[str, bool, bool]] = {}  # raw tag -> (name, closing, exact)
    pos = start
    for m in _TAG_RE.finditer(text, start):
        s, end = m.span()
        if s > pos:
            yield text[pos:s]
            n = count("\n", pos, s)
            if n:
                line += n
                line_start = rfind("\n", pos, s) + 1
        raw = m.group()
        kind = kinds.get(raw)
        if kind is None:
            kind = kinds[raw] = (_CANON[raw.strip("</>").lower()], raw[1] == "/", raw in _EXACT)
        yield _Tok(raw, s, line, s - line_start + 1, *kind)
        pos = end
    if pos < len(text):
        yield text[pos:]


# ----------------------------------------------------------------------------- parser


class _Parser:
    """Recursive descent over the lexed stream; always recovers, always records issues."""

    def __init__(self, text: str):
        self.text = text
        self.issues: list[Issue] = []
        self.path_depth = 0
        self._closed = False
        self._end_at: Where | None = None
        self._toks: Iterator[Token] = iter(())
        self._cur: Token | None = None  # the token of lookahead
        self._back: Token | None = None  # the token after it, when one was put back
        self._tag: _Tok | None = None  # the last tag consumed: a text token starts where it ends

    # helpers -----------------------------------------------------------------
    def _start(self, offset: int) -> None:
        self._toks = _lex(self.text, offset)
        self._cur = next(self._toks, None)

    def _issue(self, where: _Tok | Where, message: str) -> None:
        line, col = (where.line, where.col) if isinstance(where, _Tok) else where
        self.issues.append(Issue(line, col, message))

    def _end(self) -> Where:
        """Where the text ends."""
        if self._end_at is None:
            self._end_at = _line_col(self.text, len(self.text))
        return self._end_at

    def _skip(self) -> Token:
        """Consume the lookahead token (text: never an issue)."""
        tok = self._cur
        assert tok is not None
        if self._back is not None:
            self._cur, self._back = self._back, None
        else:
            self._cur = next(self._toks, None)
        if not isinstance(tok, str):
            self._tag = tok
        return tok

    def _next(self) -> _Tok:
        """Consume the lookahead tag."""
        tok = self._skip()
        assert isinstance(tok, _Tok)
        if not tok.exact:
            self._issue(tok, f"tag {tok.text} is not written exactly as {tok.tag}")
        return tok

    def _text_start(self) -> tuple[int, int, int]:
        """(offset, line, column) of the text token just consumed or looked at."""
        return self._tag.end() if self._tag is not None else (0, 1, 1)

    def _first_char(self, text: str) -> Where:
        """Where the first non-space character of the text token ``text`` is."""
        _, line, col = self._text_start()
        lead = len(text) - len(text.lstrip())
        newline = text.rfind("\n", 0, lead)
        if newline < 0:
            return line, col + lead
        return line + text.count("\n", 0, lead), lead - newline

    def _unread(self, tok: _Tok) -> None:
        """Put back ``tok``, the token just consumed."""
        self._back, self._cur = self._cur, tok

    @staticmethod
    def _where(tok: _Tok) -> str:
        return f"line {tok.line} col {tok.col}"

    # document ----------------------------------------------------------------
    def document(self) -> Document:
        doc = Document()
        text = self.text
        think = _THINK_RE.search(text)
        if think is None or think.group(1):
            doc.has_think = False
            first = _TAG_RE.search(text)
            if first is not None:
                self._issue(_line_col(text, first.start()), "no <Think> before the first tag")
            self._start(0)
            doc.body = self.items("Think", None)
            doc.think_closed = True
            return doc
        doc.before = text[: think.start()]
        self._start(think.start())
        opener = self._next()
        doc.body = self.items("Think", opener)
        doc.think_closed = self._closed
        rest = self._cur
        if rest is not None:
            doc.after = text[self._text_start()[0] if isinstance(rest, str) else rest.offset :]
        while (tok := self._cur) is not None:
            self._skip()
            if not isinstance(tok, str):
                self._issue(tok, f"{tok.text} after </Think>")
        return doc

    def items(self, context: str, opener: _Tok | None) -> list[Item]:
        """Text and blocks until ``</context>``; sets ``self._closed`` (whether it came)."""
        out: list[Item] = []
        parts: list[str] = []  # text read since the last block, joined once

        def done(closed: bool) -> list[Item]:
            if parts:
                out.append("".join(parts))
            self._closed = closed
            return out

        while (tok := self._cur) is not None:
            if isinstance(tok, str):
                self._skip()
                parts.append(tok)
                continue
            if tok.closing and tok.name == context:
                self._next()
                return done(True)
            if not tok.closing and tok.name == "Parallel":
                self._next()
                if parts:
                    out.append("".join(parts))
                    parts.clear()
                out.append(self.block(tok))
                continue
            if context == "Path" and (tok.name, tok.closing) in _ENDS_PATH:
                # the path was never closed: the block around it goes on (engine-cut paths)
                self._issue(tok, f"<Path> opened at {self._where(opener)} is not closed before {tok.text}")
                return done(False)
            self._next()
            if tok.closing and tok.name == "Think" and context == "Path":
                self._issue(tok, "stray </Think> inside a <Path> (ignored)")
            else:
                where = f"<{context}>" if opener is not None or context == "Path" else "the text"
                self._issue(tok, f"unexpected {tok.text} inside {where} (kept as text)")
                parts.append(tok.text)
        if opener is not None:
            self._issue(self._end(), f"text ends inside <{context}> opened at {self._where(opener)}")
        return done(False)

    def leaf(self, opener: _Tok) -> tuple[str, bool]:
        """Plain text until the matching closing tag (Outline / Conclusion)."""
        parts: list[str] = []
        while (tok := self._cur) is not None:
            if isinstance(tok, str):
                self._skip()
                parts.append(tok)
                continue
            if tok.closing and tok.name == opener.name:
                self._next()
                return "".join(parts), True
            # a structural tag: the leaf was never closed; let the caller see the tag
            self._issue(tok, f"<{opener.name}> opened at {self._where(opener)} is not closed before {tok.text}")
            return "".join(parts), False
        self._issue(self._end(), f"text ends inside <{opener.name}> opened at {self._where(opener)}")
        return "".join(parts), False

    def block(self, opener: _Tok) -> Block:
        blk = Block(line=opener.line, col=opener.col, closed=False, conclusion=None)
        goal_seen = False
        goal_tok: _Tok | None = None
        path_toks: list[_Tok] = []
        end = opener
        while (tok := self._cur) is not None:
            if isinstance(tok, str):
                self._skip()
                if not tok.isspace():
                    self._issue(self._first_char(tok), "text outside <Goal>/<Path>/<Conclusion> inside <Parallel> (dropped)")
                continue
            self._next()
            if tok.closing and tok.name == "Parallel":
                blk.closed = True
                end = tok
                break
            if tok.closing:
                self._issue(tok, f"unexpected {tok.text} inside <Parallel> opened at {self._where(opener)}")
                if tok.name == "Think" or (tok.name == "Path" and self.path_depth > 0):
                    # the enclosing context closes: the block was never closed
                    self._unread(tok)
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
            self._issue(self._end(), f"text ends inside <Parallel> opened at {self._where(opener)}")
        if blk.closed:
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
        while (tok := self._cur) is not None:
            if isinstance(tok, str):
                self._skip()
                if not tok.isspace():
                    self._issue(self._first_char(tok), "text outside <Outline> inside <Goal> (dropped)")
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
        self._issue(self._end(), f"text ends inside <Goal> opened at {self._where(opener)}")
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
