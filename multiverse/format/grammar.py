"""The Multiverse text format: tags, tree, parser, validator, tolerant reader, flatten.

This is the ONE grammar module of the project (SPEC.md section 1); the curator, the trainer,
the engine and ``multiverse inspect`` all use it. The token-level layout rule (positions and
masks, SPEC section 3) lives beside it in :mod:`multiverse.format.layout` and shares :data:`TAGS`.

The tree types live in :mod:`multiverse.format.document`, the parser in
:mod:`multiverse.format.parser`; this module is the API and re-exports both.

Invariants:
  * ``serialize(parse(text)) == text`` for canonical text (one tag per line, no indentation,
    labels written ``N: ``, exactly one ``\\n`` between structural tags).
  * ``parse`` (strict) raises :class:`MultiverseSyntaxError` listing every violation;
    ``validate`` returns the same list; ``read`` never raises and recovers what it can.
  * Line and column numbers in issues are 1-based and point at the offending tag or text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from multiverse.format.document import (  # noqa: F401 (the tree types are part of this API)
    _CANON,
    _CUE_RE,
    _LABEL_RE,
    _TAG_RE,
    CUE,
    TAG_NAMES,
    TAGS,
    Block,
    Document,
    Issue,
    Item,
    MultiverseSyntaxError,
    Outline,
    PathNode,
    unique_labels,
)
from multiverse.format.parser import _Parser, _split_label, _strip_nl
from multiverse.format.prompts import (  # noqa: F401 (public names)
    ANSWER_PREFIX,
    PROMPT_SUFFIX_PARALLEL,
    PROMPT_SUFFIX_SEQUENTIAL,
)

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
    ``<Parallel>`` up to ``</Goal>``. Labels are unique: a repeated or missing label takes the
    next number not used (:func:`~multiverse.format.document.unique_labels`, the one rule).
    """
    labels: list[str | None] = []
    for m in re.finditer(r"<outline>(.*?)(?:</outline>|(?=<outline>)|$)", goal_text, re.IGNORECASE | re.DOTALL):
        label, _ = _split_label(_strip_nl(m.group(1)).lstrip())
        labels.append(label)
    return unique_labels(labels)


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
