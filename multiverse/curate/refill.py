"""Refill: the original units into a skeleton, the block edits, the canonical Multiverse text.

:func:`render` writes the canonical SPEC 1.2 layout: ``<Think>``, each block preceded by the
cue line, labelled Outlines and Paths (``1:``, ``2:``; nested ``1.1:``), the Conclusion. The
cue line and the labels are inserted here, never by the LLM. Units that stay in one container
(top level or one path) keep their own separators; a unit that starts a container starts a
line.

Edits (:func:`apply_edits`) change the text of the units directly in one path: an edit
applies only when its ``find`` occurs exactly once among that path's units (and inside one
unit); otherwise it is skipped and reported. Unit texts are held in a ``dict`` (unit number ->
text) so the original :class:`~multiverse.curate.units.Unit` list is never changed.

Invariant (property-tested): ``grammar.flatten(render(skeleton, texts))`` equals the
normalised chain with the separators at container boundaries made newlines, when no edit
was applied.
"""

from __future__ import annotations

from dataclasses import dataclass

from multiverse.curate.plan import Edit
from multiverse.curate.skeleton import SkBlock, SkItem
from multiverse.curate.units import Unit
from multiverse.format import grammar


@dataclass(slots=True)
class EditResult:
    edit: Edit
    applied: bool
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {**self.edit.to_json(), "applied": self.applied, "reason": self.reason}


def apply_edits(block: SkBlock, edits: list[Edit], texts: dict[int, str]) -> list[EditResult]:
    """Apply ``edits`` to the direct units of ``block``'s paths in ``texts`` (in place)."""
    results: list[EditResult] = []
    for e in edits:
        if not 1 <= e.path <= len(block.paths):
            results.append(EditResult(e, False, f"path {e.path} does not exist"))
            continue
        owned = block.paths[e.path - 1].units()
        counts = {u: texts[u].count(e.find) for u in owned} if e.find else {}
        total = sum(counts.values())
        if total != 1:
            where = "not found" if total == 0 else f"found {total} times"
            results.append(EditResult(e, False, f"find {e.find!r} {where} in path {e.path}"))
            continue
        unit = next(u for u, c in counts.items() if c)
        texts[unit] = texts[unit].replace(e.find, e.replace, 1)
        results.append(EditResult(e, True))
    return results


def _label(prefix: str, k: int) -> str:
    return f"{prefix}{k + 1}"


def render_container(items: list[SkItem], texts: dict[int, str], seps: dict[int, str], prefix: str) -> str:
    """The text of one container (the top level or one path): units joined by their own
    separators, blocks rendered in place (labels prefixed with ``prefix``)."""
    out: list[str] = []
    line_open = False
    for x in items:
        if isinstance(x, int):
            text = texts[x].strip("\n")
            if not text.strip():
                continue
            out.append((seps[x] if line_open else "") + text)
            line_open = True
            continue
        if line_open:
            out.append("\n")
            line_open = False
        out.append(render_block(x, texts, seps, prefix))
    if line_open:
        out.append("\n")
    return "".join(out)


def render_block(block: SkBlock, texts: dict[int, str], seps: dict[int, str], prefix: str = "") -> str:
    """One block (cue line included), ending with a newline."""
    labels = [_label(prefix, k) for k in range(len(block.paths))]
    out = [f"{grammar.CUE}\n<Parallel>\n<Goal>\n"]
    for label, outline in zip(labels, block.outlines or [""] * len(labels), strict=False):
        out.append(f"<Outline>\n{label}: {outline}\n</Outline>\n")
    out.append("</Goal>\n")
    for label, path in zip(labels, block.paths, strict=True):
        out.append(f"<Path>\n{label}: {render_container(path.items, texts, seps, label + '.')}</Path>\n")
    out.append(f"<Conclusion>\n{block.conclusion}\n</Conclusion>\n</Parallel>\n")
    return "".join(out)


def render(items: list[SkItem], units: list[Unit], texts: dict[int, str] | None = None) -> str:
    """The whole chain: ``<Think>\\n`` ... ``</Think>`` (no answer)."""
    texts = {u.index: u.text for u in units} if texts is None else texts
    seps = {u.index: u.sep or "\n" for u in units}
    return "<Think>\n" + render_container(items, texts, seps, "") + "</Think>"


def outline_text(text: str, label: str) -> str:
    """An outline as the LLM gave it, one line, with a leading ``label:`` it may have added
    removed (the code inserts labels)."""
    line = " ".join(text.split())
    for lead in (f"{label}:", f"{label}."):
        if line.startswith(lead):
            return line[len(lead) :].strip()
    return line
