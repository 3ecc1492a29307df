"""The Multiverse document tree (SPEC 1.1-1.2): tags, ``Document`` / ``Block`` / ``PathNode`` /
``Outline``, and the ``Issue`` a violation is reported as. Plain data; no parsing here.

The names are re-exported by :mod:`multiverse.format.grammar`, the module callers use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

TAGS: tuple[str, ...] = (
    "<Think>", "</Think>", "<Parallel>", "</Parallel>", "<Goal>", "</Goal>",
    "<Outline>", "</Outline>", "<Path>", "</Path>", "<Conclusion>", "</Conclusion>",
)  # fmt: skip
"""The twelve tags, in the order they are added to a tokenizer (SPEC 1.1)."""

TAG_NAMES: tuple[str, ...] = ("Think", "Parallel", "Goal", "Outline", "Path", "Conclusion")
CUE = "Let's think in parallel."

# any casing of the ASCII letters only (Unicode folding would take <concluſion>, <outlıne>)
_TAG_RE = re.compile(r"<(/?)(think|parallel|goal|outline|path|conclusion)>", re.IGNORECASE | re.ASCII)
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
class PathNode:
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
    paths: list[PathNode] = field(default_factory=list)
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


def unique_labels(labels: Sequence[str | None]) -> list[str]:
    """The labels a block's Outlines stand for, in order (SPEC 4; the engine forks one Path per
    Outline with these). Labels are unique within a block: a written label is kept unless an
    earlier Outline already has it; a repeated or missing one takes the next number not used
    (counting on from the previous Outline's number), with the others' nested prefix (``1.``
    when the first written label is ``1.2``; under it a bare ``2`` is the same label as ``1.2``,
    as in a stream's branch names). ``["2", None]`` and ``["2", "2"]`` give ``["2", "3"]``;
    ``[None, None]`` gives ``["1", "2"]``; ``["1.2", "2"]`` gives ``["1.2", "1.3"]``."""
    known = [x for x in labels if x]
    prefix = known[0].rsplit(".", 1)[0] + "." if known and "." in known[0] else ""
    out: list[str] = []
    used: set[str] = set()  # full labels: a bare number in a nested block with the prefix

    def full(label: str) -> str:
        return prefix + label if prefix and "." not in label else label

    prev = 0
    for label in labels:
        if not label or full(label) in used:
            k = prev + 1
            while f"{prefix}{k}" in used:
                k += 1
            label = f"{prefix}{k}"
        used.add(full(label))
        out.append(label)
        prev = int(label.rsplit(".", 1)[-1])
    return out


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
