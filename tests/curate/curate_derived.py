"""The replies a perfect curating LLM would give for a chain whose Multiverse form is known.

:class:`Derived` reads a Multiverse ``chain`` (a synthetic task record's, or a real
Multiverse-32B trace's) and derives, against the curator's own units of its flattened text:

* summarise: one step per stretch of plain text and one per path (a path holding a nested
  block gets sub-steps), the summaries being the path's own Outline, or the first ten words of
  a stretch of plain text;
* parallelise: one group per block, with a one-line reason;
* mapreduce: per block the chain's own Outlines and Conclusion (one line each), and the edits
  the prompt asks for: a path whose first line opens with "Alternatively", "Similarly", ...
  (:data:`multiverse.curate.checks.FORBIDDEN_OPENINGS`) loses that opening.

A block the curator cannot express (one path, or deeper than two levels) is read as plain text,
as a perfect curator would have to. A unit is counted in the stretch of text where it starts (a
code fence left open in one path runs on into the next in the flattened chain).
"""

from __future__ import annotations

import bisect
from typing import Any

from multiverse.curate import units as U
from multiverse.curate.checks import _OPENING_RE
from multiverse.format import grammar

REASON = "each step works on its own part and none uses another step's result"


def _gist(text: str, words: int = 10) -> str:
    """A one-line summary of a stretch of text: its first words (about as long as what a
    summarising LLM writes)."""
    first = next((x for x in text.split("\n") if x.strip() and not grammar.is_cue(x)), "")
    return " ".join(first.split()[:words])


def _flat(items: list[Any]) -> str:
    return grammar.flatten(grammar.Document(body=list(items), has_think=False))


def _lines(text: str) -> int:
    return len(text.split("\n")) if text else 0


def opening_edit(own: str) -> dict[str, str] | None:
    """``{"find", "replace"}`` removing a forbidden opening from the first line of a path's own
    text (``"Alternatively, if x"`` -> ``"If x"``), the find made long enough to occur once."""
    first = own.split("\n", 1)[0]
    m = _OPENING_RE.match(first)
    if not m:
        return None
    rest = first[m.end() :]
    words = rest.lstrip(" ,;:").split(" ")
    head = first[: len(first) - len(rest.lstrip(" ,;:"))]
    for k in range(1, len(words) + 1):
        tail = " ".join(words[:k])
        find = head + tail
        if own.count(find) == 1:
            return {"find": find, "replace": tail[:1].upper() + tail[1:]}
    return None


class Derived:
    """The perfect replies for one record with a Multiverse ``chain`` (see the module docstring)."""

    def __init__(self, chain: str):
        doc = grammar.parse(chain)
        units = U.split_units(U.normalise(grammar.flatten(doc)))
        self.unit_lines: list[int] = []  # the flattened line each unit starts on
        line = 0
        for u in units:
            line += u.index > 1 and "\n" in u.sep
            self.unit_lines.append(line)
            line += u.text.count("\n")
        self.line = 0  # lines of the flattened chain read so far
        self.n = 0  # units taken so far
        self.steps: list[dict[str, Any]] = []
        self.groups: list[dict[str, Any]] = []
        self.blocks: dict[tuple[str, ...], dict[str, Any]] = {}
        self._sequence(doc.body, self.steps, prefix="", depth=1)

    def _take(self, text: str) -> tuple[int, int] | None:
        """The units starting in the next ``text`` (flattened) of the chain."""
        self.line += _lines(_flat([text]))
        last = bisect.bisect_left(self.unit_lines, self.line)
        if last <= self.n:
            return None
        first, self.n = self.n + 1, last
        return first, last

    @staticmethod
    def _merged(body: list[Any], depth: int) -> list[Any]:
        """``body`` with the blocks the curator cannot express flattened, adjacent text joined."""
        out: list[Any] = []
        for item in body:
            if not isinstance(item, str) and (len(item.paths) < 2 or depth > 2):
                item = _flat([item]) + "\n"
            if isinstance(item, str) and out and isinstance(out[-1], str):
                out[-1] = out[-1].rstrip("\n") + "\n" + item
            else:
                out.append(item)
        return out

    def _sequence(self, body: list[Any], out: list[dict[str, Any]], prefix: str, depth: int) -> None:
        for item in self._merged(body, depth):
            if isinstance(item, str):
                rng = self._take(item)
                if rng:
                    out.append({"id": f"{prefix}{len(out) + 1}", "units": list(rng), "summary": _gist(item)})
                continue
            outlines = [" ".join(o.text.split()) for o in item.outlines][: len(item.paths)]
            outlines += [""] * (len(item.paths) - len(outlines))
            outlines = [o or _gist(_flat(p.body)) for o, p in zip(outlines, item.paths, strict=True)]
            ids: list[str] = []
            kept: list[int] = []
            edits: list[dict[str, Any]] = []
            for k, (path, summary) in enumerate(zip(item.paths, outlines, strict=True)):
                sid = f"{prefix}{len(out) + 1}"
                step: dict[str, Any] = {"id": sid, "summary": summary}
                first = self.n + 1
                inner = self._merged(path.body, depth + 1)
                if any(not isinstance(x, str) for x in inner):
                    subs: list[dict[str, Any]] = []
                    self._sequence(inner, subs, prefix=f"{sid}.", depth=depth + 1)
                    step["substeps"] = subs
                else:
                    self._take(_flat(path.body))
                if self.n < first:  # a path with no unit of its own: cannot be a step
                    continue
                step["units"] = [first, self.n]
                out.append(step)
                ids.append(sid)
                kept.append(k)
                own = "\n".join(x.strip() for x in inner if isinstance(x, str)).strip()
                edit = opening_edit(own)
                if edit:
                    edits.append({"path": len(kept), **edit})
            if len(ids) < 2:
                continue
            self.groups.append({"steps": ids, "reason": REASON})
            conclusion = " ".join((item.conclusion or "").split()) or "The paths' results together."
            key = tuple(_flat(item.paths[k].body) for k in kept)
            self.blocks[key] = {"outlines": [outlines[k] for k in kept], "conclusion": conclusion, "edits": edits}

    def block(self, paths: list[str]) -> dict[str, Any]:
        """The reply for the block whose paths (as the curator sends them) are ``paths``: the
        exact match, else the block with as many paths sharing the most lines (the curator's
        path text differs when a nested block was edited or a unit ran across a boundary)."""
        key = tuple(grammar.flatten(p) for p in paths)
        if key in self.blocks:
            return self.blocks[key]

        def shared(other: tuple[str, ...]) -> int:
            return sum(len(set(a.split("\n")) & set(b.split("\n"))) for a, b in zip(key, other, strict=True))

        same = [k for k in self.blocks if len(k) == len(key)]
        return self.blocks[max(same, key=shared)]
