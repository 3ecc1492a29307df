"""The LLM's replies as typed plans, read from JSON.

Three replies per record (SPEC 5, steps 1, 2 and 5):

* *summarise*: ``{"steps": [[first, last, "summary"], [first, last, "summary", [[first,
  last, "summary"], ...]], ...]}`` (prompt v2: step ``k`` has id ``"k"``, its sub-step ``j``
  ``"k.j"``), or the v1 objects ``{"id", "units": [first, last], "summary", "substeps"}``; two
  levels at most; unit numbers are 1-based and inclusive;
* *parallelise*: ``{"groups": [["2", "3"], ["4.1", "4.2"], ...]}`` (prompt v2) or the v1
  objects ``{"steps": ["2", "3"], "reason": "..."}``; a group lists adjacent sibling step ids
  (top-level steps, or sub-steps of one step);
* *mapreduce* (one per block): ``{"conclusion": "...", "edits": [{"path": 1, "find": "...",
  "replace": "..."}, ...], "outlines": ["...", ...]}``; ``outlines`` may be left out (prompt
  v2): the paths' step summaries, which the request shows, are the Outlines.

The ``from_json`` readers check only shapes and types and raise :class:`PlanError` with a
message that names the offending field; the semantic rules (cover, nesting, adjacency,
counts) are in :mod:`multiverse.curate.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class PlanError(ValueError):
    """A reply that does not have the required shape; the message is quoted in the repair call."""


@dataclass(slots=True)
class Step:
    id: str
    start: int
    end: int
    summary: str
    substeps: list[Step] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "units": [self.start, self.end], "summary": self.summary}
        if self.substeps:
            out["substeps"] = [s.to_json() for s in self.substeps]
        return out


@dataclass(slots=True)
class Group:
    steps: list[str]
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "reason": self.reason}


@dataclass(slots=True)
class Edit:
    path: int  # 1-based path number within its block
    find: str
    replace: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "find": self.find, "replace": self.replace}


@dataclass(slots=True)
class BlockText:
    outlines: list[str]
    conclusion: str
    edits: list[Edit] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "outlines": list(self.outlines),
            "conclusion": self.conclusion,
            "edits": [e.to_json() for e in self.edits],
        }


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise PlanError(f"{where} needs a list '{key}', got {type(value).__name__ if key in obj else 'nothing'}")
    return value


def _str(obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise PlanError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _step(raw: Any, where: str, depth: int, implied: str) -> Step:
    """One step: ``[first, last, "summary", [sub-steps]]`` (v2, the id implied by the position:
    ``implied``) or ``{"id", "units": [first, last], "summary", "substeps"}`` (v1; the id
    optional)."""
    if isinstance(raw, list):
        if not (3 <= len(raw) <= 4):
            raise PlanError(f"{where} (step {implied}): a step is [first, last, \"summary\"] or "
                            f"[first, last, \"summary\", [sub-steps]], got {len(raw)} items")  # fmt: skip
        raw = {"id": implied, "units": raw[:2], "summary": raw[2], "substeps": raw[3] if len(raw) == 4 else []}
    obj = _obj(raw, where)
    sid = obj.get("id", implied)
    if isinstance(sid, int):
        sid = str(sid)
    if not isinstance(sid, str) or not sid:
        raise PlanError(f"{where}: 'id' must be a non-empty string")
    rng = obj.get("units")
    if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng)):
        raise PlanError(f"{where} (step {sid}): 'units' must be [first, last] unit numbers, got {rng!r}")
    subs_raw = obj.get("substeps") or []
    if not isinstance(subs_raw, list):
        raise PlanError(f"{where} (step {sid}): 'substeps' must be a list")
    if subs_raw and depth >= 2:
        raise PlanError(f"{where} (step {sid}): sub-steps may not have sub-steps (two levels at most)")
    subs = [_step(s, f"{where}.substeps[{k}]", depth + 1, f"{sid}.{k + 1}") for k, s in enumerate(subs_raw)]
    return Step(sid, rng[0], rng[1], _str(obj, "summary", f"step {sid}", ""), subs)


def steps_from_json(raw: Any) -> list[Step]:
    obj = _obj(raw, "the summarise reply")
    steps = _list(obj, "steps", "the summarise reply")
    return [_step(s, f"steps[{k}]", 1, str(k + 1)) for k, s in enumerate(steps)]


def groups_from_json(raw: Any) -> list[Group]:
    obj = _obj(raw, "the parallelise reply")
    groups: list[Group] = []
    for k, g in enumerate(_list(obj, "groups", "the parallelise reply")):
        if isinstance(g, list):  # v2: a group is its list of step ids
            g = {"steps": g}
        g = _obj(g, f"groups[{k}]")
        ids = _list(g, "steps", f"groups[{k}]")
        ids = [str(x) if isinstance(x, int) else x for x in ids]
        if not all(isinstance(x, str) for x in ids):
            raise PlanError(f"groups[{k}]: 'steps' must be step ids (strings)")
        groups.append(Group(ids, _str(g, "reason", f"groups[{k}]", "")))
    return groups


def block_text_from_json(raw: Any, default_outlines: list[str] | None = None) -> BlockText:
    """The block text; ``outlines`` may be left out when ``default_outlines`` (the paths' step
    summaries, v2) are given."""
    obj = _obj(raw, "the mapreduce reply")
    if obj.get("outlines") is None and default_outlines is not None:
        outlines = list(default_outlines)
    else:
        outlines = _list(obj, "outlines", "the mapreduce reply")
    if not all(isinstance(x, str) for x in outlines):
        raise PlanError("the mapreduce reply: every outline must be a string")
    edits: list[Edit] = []
    for k, e in enumerate(obj.get("edits") or []):
        e = _obj(e, f"edits[{k}]")
        path = e.get("path")
        if not isinstance(path, int):
            raise PlanError(f"edits[{k}]: 'path' must be a path number (1-based int), got {path!r}")
        edits.append(Edit(path, _str(e, "find", f"edits[{k}]"), _str(e, "replace", f"edits[{k}]", "")))
    return BlockText(list(outlines), _str(obj, "conclusion", "the mapreduce reply"), edits)
