"""Counts of the built-in approximate tokenizer, in linear time and without a string per token.

The tokenizer is :func:`multiverse.format.grammar.approx_tokens` ("builtin-regex": each tag,
digit, word, newline and punctuation mark is one token); it is the reference. It builds one
Python string per token (50 MB of text: 17M strings, seconds and gigabytes), so the counts
here are taken from the UTF-8 bytes instead. Each byte is mapped to a class (``bytes.translate``):

  * ``a``: an ASCII letter (a run of letters is one token);
  * ``p``: a character that is one token by itself: a digit, ``\\n``, any other ASCII character
    that is not white space, and the first byte of a non-ASCII character;
  * `` ``: neither: the other ASCII white space, and the continuation bytes of a character;

and a range of text holds ``count(b"p") + count(b"pa") + count(b" a")`` tokens (a letter run
begins after a byte that is not a letter; at offset 0, when the text begins with one) between
the tags, which a regex on the bytes finds (each is one token). This is exact unless the text
holds one of the characters the byte classes cannot see: the non-ASCII white space (not a
token) and the four non-ASCII letters that ``[A-Za-z]`` takes under IGNORECASE (İ ı ſ K); a
piece with one is counted by the reference. The text is taken a piece at a time (about a million characters, cut where no
token spans the cut), so the memory used stays bounded. Parity with the reference:
tests/format/test_approx_count.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from multiverse.format.grammar import TAGS, approx_tokens

Run = tuple[str | None, int]  # (a tag of TAGS, 1) or (None, how many ordinary tokens in a row)

_CLASS = bytes(
    ord("a") if chr(b).isascii() and chr(b).isalpha()
    else ord("p") if b == 10 or (b < 128 and not chr(b).isspace()) or b >= 0xC0
    else ord(" ")
    for b in range(256)
)  # fmt: skip
_BYTE_TAG_RE = re.compile(rb"<(/?)(?:think|parallel|goal|outline|path|conclusion)>", re.IGNORECASE)
_EXACT = {t.encode(): t for t in TAGS}
_CUT_RE = re.compile(r"[<\s]")
PIECE = 1 << 20  # characters encoded at a time
# characters the byte classes get wrong: white space beyond ASCII, letters [A-Za-z] takes (re.I)
_EXOTIC_RE = re.compile(
    "[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\u0130\u0131\u017f\u212a]"
)


def _classes(text: str) -> tuple[bytes, bytes] | None:
    """(UTF-8 bytes, class bytes) of ``text``, or None when only the reference counts it."""
    if not text.isascii() and _EXOTIC_RE.search(text):
        return None
    raw = text.encode("utf-8", "surrogatepass")
    return raw, raw.translate(_CLASS)


def _tokens_in(cls: bytes, start: int, end: int) -> int:
    """Tokens in ``cls[start:end]``, a range holding no tag."""
    if start >= end:
        return 0
    before = start - 1 if start else 0  # the byte before the range: does a letter run begin?
    first = 1 if start == 0 and cls[0] == 97 else 0
    return (
        cls.count(b"p", start, end)
        + cls.count(b"pa", before, end)
        + cls.count(b" a", before, end)
        + first
    )


def _pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, each cut before a ``<`` or after white
    space: no token spans two pieces, and each piece is counted alone (bounded memory)."""
    start, n = 0, len(text)
    while start < n:
        end = n
        if start + size < n:
            m = _CUT_RE.search(text, start + size)
            if m is not None:
                end = m.start() if text[m.start()] == "<" else m.end()
        yield text[start:end]
        start = end


def count(text: str, piece: int = PIECE) -> int:
    """``len(approx_tokens(text))``."""
    return sum(n for _, n in runs(text, piece))


def runs(text: str, piece: int = PIECE) -> Iterator[Run]:
    """The tokens of ``text`` as the layout rule reads them: each tag written exactly as in
    :data:`TAGS` as ``(tag, 1)``, and the ordinary tokens between as ``(None, n)``, ``n > 0``
    (a tag in another casing is an ordinary token, as in ``TokenCounter.tags``). The text is
    encoded ``piece`` characters at a time."""
    plain = 0
    for chunk in _pieces(text, piece):
        parts = _classes(chunk)
        if parts is None:  # the reference
            for t in approx_tokens(chunk):
                if t not in TAGS:
                    plain += 1
                    continue
                if plain:
                    yield None, plain
                    plain = 0
                yield t, 1
            continue
        raw, cls = parts
        pos = 0
        for m in _BYTE_TAG_RE.finditer(raw):
            start, end = m.span()
            if start > pos:
                plain += _tokens_in(cls, pos, start)
            tag = _EXACT.get(m.group())
            if tag is None:  # a tag in another casing: an ordinary token
                plain += 1
            else:
                if plain:
                    yield None, plain
                    plain = 0
                yield tag, 1
            pos = end
        plain += _tokens_in(cls, pos, len(cls))
    if plain:
        yield None, plain


def group(tags: Iterable[str | None]) -> Iterator[Run]:
    """Per-token tags (None for an ordinary token) as runs (see :func:`runs`)."""
    plain = 0
    for tag in tags:
        if tag is None:
            plain += 1
            continue
        if plain:
            yield None, plain
            plain = 0
        yield tag, 1
    if plain:
        yield None, plain
