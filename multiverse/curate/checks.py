"""The checks every curated result passes before it is accepted (SPEC 5, "Checks").

* **grammar**: :func:`multiverse.format.grammar.validate` reports zero issues, and the blocks
  and paths per block (document order) are the ones planned;
* **content**: the normalised Levenshtein distance (``rapidfuzz``) between the flattened result
  and the flattened original is at most ``threshold`` (0.2 by default, the paper's);
* **style**: no path opens with a transition that needs a sibling ("Alternatively", "Next",
  ...), no path refers to a sibling path, no Outline, Conclusion or Path is empty.

:func:`run_checks` returns a :class:`CheckResult`: one pass/fail per check, the distance, and
the reasons (plain sentences that name the block and path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from multiverse.format import grammar

THRESHOLD = 0.2
FORBIDDEN_OPENINGS = (
    "alternatively", "next", "also", "similarly", "another", "then", "additionally", "furthermore",
    "moreover", "in addition", "likewise", "on the other hand", "finally", "lastly", "secondly",
)  # fmt: skip
_OPENING_RE = re.compile(r"^\s*(?:" + "|".join(re.escape(w) for w in FORBIDDEN_OPENINGS) + r")\b", re.IGNORECASE)
_SIBLING_RE = re.compile(
    r"\b(?:(?:previous|other|sibling|preceding|earlier|above) (?:path|branch|case)s?"
    r"|(?:path|branch) \d+(?:\.\d+)*)\b",
    re.IGNORECASE,
)


@dataclass(slots=True)
class CheckResult:
    grammar: bool = True
    content: bool = True
    style: bool = True
    distance: float = 0.0
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.grammar and self.content and self.style

    def to_json(self) -> dict[str, Any]:
        return {"grammar": self.grammar, "content": self.content, "style": self.style,
                "distance": round(self.distance, 6), "reasons": list(self.reasons)}  # fmt: skip


def check_grammar(text: str, planned_paths: list[int], read: tuple[Any, list[Any]] | None = None) -> list[str]:
    """``read``: ``grammar.read(text)`` when the caller has it already."""
    doc, issues = read or grammar.read(text)
    reasons = [f"grammar: {i}" for i in issues[:5]]
    if issues:
        return reasons
    found = grammar.stats(doc).paths
    if found != planned_paths:
        reasons.append(f"grammar: paths per block {found} differ from the plan {planned_paths}")
    return reasons


def distance(result: str | grammar.Document, original: str) -> float:
    """Normalised edit distance between the flattened texts (0 = identical, 1 = unrelated)."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_distance(grammar.flatten(result), grammar.flatten(original)))


def check_style(text: str | grammar.Document) -> list[str]:
    doc = grammar.read(text)[0] if isinstance(text, str) else text
    reasons: list[str] = []
    for depth, blk in doc.iter_blocks():
        where = f"block at line {blk.line}" if blk.line else f"block at depth {depth}"
        for o in blk.outlines:
            if not o.text.strip():
                reasons.append(f"style: {where}: outline {o.label} is empty")
        if not (blk.conclusion or "").strip():
            reasons.append(f"style: {where}: the conclusion is empty")
        for p in blk.paths:
            own = "\n".join(x for x in p.body if isinstance(x, str)).strip()
            if not own and not p.blocks:
                reasons.append(f"style: {where}: path {p.label} is empty")
                continue
            first = own.split("\n", 1)[0]
            m = _OPENING_RE.match(first)
            if m:
                reasons.append(f"style: {where}: path {p.label} opens with {m.group(0).strip()!r}")
            ref = _SIBLING_RE.search(own)
            if ref:
                reasons.append(f"style: {where}: path {p.label} refers to a sibling ({ref.group(0)!r})")
    return reasons


def run_checks(result: str, original: str, planned_paths: list[int], threshold: float = THRESHOLD) -> CheckResult:
    """All three checks on ``result`` (a curated chain) against the normalised ``original``."""
    out = CheckResult()
    read = grammar.read(result)  # once for the three checks (it runs on the event loop)
    g = check_grammar(result, planned_paths, read)
    out.grammar = not g
    out.distance = distance(read[0], original)
    content = []
    if out.distance > threshold:
        content.append(f"content: edit distance {out.distance:.3f} to the original is over the threshold {threshold}")
    out.content = not content
    s = check_style(read[0])
    out.style = not s
    out.reasons = g + content + s
    return out
