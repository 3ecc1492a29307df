"""The text of one growing branch, for the streamer (:mod:`.streaming`): incremental, and the
full re-decode it must equal (the reference, and the parity tests' oracle).

A branch's text is its ``own_ids`` from ``first`` (the root: from the prompt's end) decoded,
with its stop cuts applied (:mod:`multiverse.engine.stops`) and each merged block read as its
children's texts. Both decoders give, after :meth:`advance`:

* ``length()`` / ``piece(a, b)``: the *visible* text, everything but a trailing partial UTF-8
  character (all of it once ``final``);
* ``run_len()``: how many of its last characters are the live run (where a stop could still
  begin); ``tail(n)``: its last ``n`` characters.

:class:`IncrementalText` decodes only the new tokens: the ``prefix_offset`` / ``read_offset``
technique of detokenizers (the new tokens are decoded with a few committed tokens before them
as context; text ending in a partial character (U+FFFD) waits for the next token), committing at
every engine-inserted token or tag (where a run starts: a clean boundary). Per step it decodes a
handful of tokens, whatever the length, and keeps its text as a :class:`Chars` (appending to a
``str`` attribute copies the whole string: O(length) a step). :class:`FullText` re-decodes the
whole branch each time.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from multiverse.engine import stops

Decode = Callable[[list[int]], str]
BlockText = Callable[[Any, Any], str]  # (branch, BlockRecord) -> the block's text


class Chars:
    """A growing string as frozen chunks of at least ``chunk`` characters plus a short tail:
    appending copies only the tail, reading a piece copies only that piece (``str +=`` on an
    attribute copies the whole string every time)."""

    __slots__ = ("chunk", "chunks", "starts", "frozen", "tail")

    def __init__(self, chunk: int = 1024) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = chunk
        self.chunks: list[str] = []
        self.starts: list[int] = []  # where each chunk starts
        self.frozen = 0  # characters in the chunks
        self.tail = ""

    def __len__(self) -> int:
        return self.frozen + len(self.tail)

    def append(self, s: str) -> None:
        self.tail += s
        if len(self.tail) >= self.chunk:
            self.starts.append(self.frozen)
            self.chunks.append(self.tail)
            self.frozen += len(self.tail)
            self.tail = ""

    def piece(self, a: int, b: int | None = None) -> str:
        """``str(self)[a:b]`` for ``0 <= a``, ``b`` None or ``>= 0``."""
        n = len(self)
        b = n if b is None else min(b, n)
        if a >= b:
            return ""
        f = self.frozen
        if a >= f:
            return self.tail[a - f : b - f]
        i = bisect_right(self.starts, a) - 1
        out = []
        while i < len(self.chunks) and self.starts[i] < b:
            at = self.starts[i]
            out.append(self.chunks[i][a - at if a > at else 0 : b - at])
            i += 1
        if b > f:
            out.append(self.tail[: b - f])
        return "".join(out)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` characters."""
        if n >= self.frozen:
            self.tail = self.tail[: n - self.frozen]
            return
        i = bisect_right(self.starts, n) - 1
        self.tail = self.chunks[i][: n - self.starts[i]]
        self.frozen = self.starts[i]
        del self.chunks[i:], self.starts[i:]

    def __str__(self) -> str:
        return "".join(self.chunks) + self.tail


class FullText:
    """The reference: the whole branch re-decoded by :func:`multiverse.engine.stops.render`."""

    __slots__ = ("first", "nb", "text", "run")

    def __init__(self, first: int) -> None:
        self.first, self.nb, self.text, self.run = first, 0, "", 0

    def advance(self, b: Any, decode: Decode, tags: dict[int, str], final: bool,
                block_text: BlockText) -> list[tuple[int, int]]:  # fmt: skip
        """Read ``b`` now; returns ``(start, length)`` of each block merged since the last call."""
        ids, cuts = b.own_ids, b.cuts
        new = [
            (blk.start, len(stops.render(decode, ids, cuts, blk.start, blk.end)))
            for blk in b.blocks[self.nb :]
        ]
        self.nb = len(b.blocks)
        full = stops.render(decode, ids, cuts, self.first)
        self.text = full if final else full.rstrip("\ufffd")
        r = stops.run_start(ids, b.own_forced, tags, self.first)
        run = (
            decode(list(ids[r:])) if r < len(ids) and not (cuts and cuts[-1][1] == len(ids)) else ""
        )
        self.run = len(run if final else run.rstrip("\ufffd"))
        return new

    def length(self) -> int:
        return len(self.text)

    def run_len(self) -> int:
        return self.run

    def piece(self, a: int, b: int | None = None) -> str:
        return self.text[a:b]

    def tail(self, n: int) -> str:
        return self.text[-n:] if n > 0 else ""


class IncrementalText:
    """The same text, decoding only what is new (see the module docstring)."""

    __slots__ = (
        "first",
        "prefix",
        "read",
        "prefix_len",
        "scan",
        "text",
        "tent",
        "run_tok",
        "run_char",
        "nb",
        "nc",
    )

    def __init__(self, first: int, chunk: int = 1024) -> None:
        self.first = first
        self.prefix = self.read = self.scan = self.run_tok = first  # token offsets into own_ids
        self.prefix_len = 0  # len(decode(own_ids[prefix:read]))
        self.text = Chars(chunk)  # committed text (up to ``read``)
        self.tent = ""  # tentative text after it (up to a trailing partial character)
        self.run_char = 0  # where the live run starts in ``text``
        self.nb = self.nc = 0  # blocks / cuts of the branch already read

    def advance(self, b: Any, decode: Decode, tags: dict[int, str], final: bool,
                block_text: BlockText) -> list[tuple[int, int]]:  # fmt: skip
        ids, forced, blocks, cuts = b.own_ids, b.own_forced, b.blocks, b.cuts
        new: list[tuple[int, int]] = []
        while True:
            blk = blocks[self.nb] if self.nb < len(blocks) else None
            cut = cuts[self.nc] if self.nc < len(cuts) else None
            if blk is None and cut is None:
                self._scan(ids, forced, tags, decode, len(ids))
                break
            if blk is not None and (cut is None or blk.start <= cut[0]):  # a merged block
                self._scan(ids, forced, tags, decode, blk.start)
                self._decode(decode, ids, blk.start, flush=True)
                text = block_text(b, blk)
                self.text.append(text)
                new.append((blk.start, len(text)))
                self._restart(blk.end)
                self.nb += 1
                while self.nc < len(cuts) and cuts[self.nc][0] < blk.end:  # the children's cuts
                    self.nc += 1
                continue
            start, end, text = cut  # type: ignore[misc]
            if self.scan <= start:
                self._scan(ids, forced, tags, decode, start)
            if self.run_tok != start:
                raise AssertionError(
                    f"stop cut at {start} does not start the run read from {self.run_tok}"
                )
            self.text.truncate(self.run_char)
            self.text.append(text)
            self._restart(end)
            self.nc += 1
        if final:
            self._decode(decode, ids, len(ids), flush=True)
        return new

    def _restart(self, at: int) -> None:
        self.prefix = self.read = self.scan = self.run_tok = at
        self.prefix_len, self.tent, self.run_char = 0, "", len(self.text)

    def _scan(
        self, ids: list[int], forced: list[bool], tags: dict[int, str], decode: Decode, end: int
    ) -> None:
        """Read tokens up to ``end``: commit after each engine-inserted token or tag (a run starts)."""
        for i in range(self.scan, end):
            if forced[i] or ids[i] in tags:
                self._decode(decode, ids, i + 1, flush=True)
                self.run_tok, self.run_char = i + 1, len(self.text)
        self.scan = max(self.scan, end)
        self._decode(decode, ids, end, flush=False)

    def _decode(self, decode: Decode, ids: list[int], upto: int, flush: bool) -> None:
        if upto <= self.read:
            return
        new = decode(ids[self.prefix : upto])
        if flush or not new.endswith("\ufffd"):
            self.text.append(new[self.prefix_len :])
            self.prefix, self.read = self.read, upto
            self.prefix_len, self.tent = len(new) - self.prefix_len, ""
        else:  # a partial character at the end: wait, show what comes before it
            self.tent = new[self.prefix_len :].rstrip("\ufffd")

    def length(self) -> int:
        return len(self.text) + len(self.tent)

    def run_len(self) -> int:
        return self.length() - self.run_char

    def piece(self, a: int, b: int | None = None) -> str:
        n = len(self.text)
        b = self.length() if b is None else b
        if b <= n:
            return self.text.piece(a, b)
        return self.text.piece(a) + self.tent[max(a - n, 0) : b - n]

    def tail(self, n: int) -> str:
        return self.piece(max(self.length() - n, 0)) if n > 0 else ""
