"""JSON extraction from an LLM reply and the semantic validators of the plans.

Every validator returns a list of messages (``[]`` = valid); each message is precise enough to
be quoted back to the LLM in the one repair call (it names the step, group or path and the
unit numbers involved).

Rules:
  * steps: top-level step ranges cover units ``1..n`` in order, without gaps or overlaps;
    ``first <= last``; the sub-steps of a step (if any) cover exactly its range, in order;
    ids unique.
  * groups: two or more ids, all siblings (all top-level, or all sub-steps of one step),
    adjacent in that order, no step in two groups.
  * block text: one non-empty, one-line Outline per path; a non-empty Conclusion; edits name
    an existing path and a non-empty ``find``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from multiverse.curate.plan import BlockText, Group, PlanError, Step

_FENCED_JSON_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON object in a reply: the whole reply, a fenced ```json block, or the span from
    the first ``{`` to the last ``}``. Raises :class:`PlanError` when there is none."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCED_JSON_RE.finditer(text)]
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{") : text.rindex("}") + 1])
    error = "empty reply"
    for c in candidates:
        if not c:
            continue
        try:
            return json.loads(c)
        except json.JSONDecodeError as e:
            error = f"{e.msg} at line {e.lineno} column {e.colno}"
    raise PlanError(f"the reply is not valid JSON ({error}); reply with one JSON object only")


def _check_cover(steps: list[Step], first: int, last: int, where: str) -> list[str]:
    errors: list[str] = []
    expected = first
    for s in steps:
        if s.start > s.end:
            errors.append(f"step {s.id}: units [{s.start}, {s.end}] is an empty range (first > last)")
            continue
        if s.start > expected:
            errors.append(f"{where}: units {expected}..{s.start - 1} are in no step (before step {s.id})")
        elif s.start < expected:
            errors.append(f"{where}: step {s.id} starts at unit {s.start}, overlapping the previous step "
                          f"(next free unit is {expected})")  # fmt: skip
        expected = max(expected, s.end + 1)
    if expected <= last:
        errors.append(f"{where}: units {expected}..{last} are in no step (after the last step)")
    elif expected > last + 1:
        errors.append(f"{where}: steps reach unit {expected - 1}, past the last unit {last}")
    return errors


def validate_steps(steps: list[Step], num_units: int) -> list[str]:
    """Full cover of units ``1..num_units`` and sub-steps nested in (and covering) their parent."""
    if not steps:
        return ["the reply has no steps; give at least one step covering all units"]
    errors = _check_cover(steps, 1, num_units, "top-level steps")
    seen: set[str] = set()
    for s in steps:
        for x in [s, *s.substeps]:
            if x.id in seen:
                errors.append(f"step id {x.id} is used twice")
            seen.add(x.id)
        if s.substeps:
            outside = [x.id for x in s.substeps if x.start < s.start or x.end > s.end]
            if outside:
                errors.append(f"sub-step(s) {', '.join(outside)} reach outside their parent step {s.id} "
                              f"(units [{s.start}, {s.end}])")  # fmt: skip
            else:
                errors += _check_cover(s.substeps, s.start, s.end, f"sub-steps of step {s.id}")
    return errors


def validate_groups(groups: list[Group], steps: list[Step]) -> list[str]:
    """Each group: two or more adjacent siblings; no step in two groups."""
    siblings: dict[str, tuple[str, int]] = {}  # id -> (parent id or "", position)
    for k, s in enumerate(steps):
        siblings[s.id] = ("", k)
        for j, x in enumerate(s.substeps):
            siblings[x.id] = (s.id, j)
    errors: list[str] = []
    used: dict[str, int] = {}
    for g_index, g in enumerate(groups, 1):
        name = f"group {g_index} ({', '.join(g.steps)})"
        unknown = [x for x in g.steps if x not in siblings]
        if unknown:
            errors.append(f"{name}: unknown step id(s) {', '.join(unknown)}")
            continue
        if len(g.steps) < 2:
            errors.append(f"{name}: a group needs at least two steps")
            continue
        parents = {siblings[x][0] for x in g.steps}
        if len(parents) > 1:
            errors.append(f"{name}: the steps are not siblings (a group holds top-level steps only, "
                          "or sub-steps of one step only)")  # fmt: skip
            continue
        positions = [siblings[x][1] for x in g.steps]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            errors.append(f"{name}: the steps are not adjacent and in order")
        for x in g.steps:
            if x in used:
                errors.append(f"{name}: step {x} is already in group {used[x]}")
            used[x] = g_index
    return errors


def validate_block_text(reply: BlockText, num_paths: int) -> list[str]:
    """One non-empty one-line Outline per path, a Conclusion, edits that name a path."""
    errors: list[str] = []
    if len(reply.outlines) != num_paths:
        errors.append(f"the block has {num_paths} paths but the reply gives {len(reply.outlines)} outlines; "
                      "give exactly one outline per path, in path order")  # fmt: skip
    for k, o in enumerate(reply.outlines, 1):
        if not o.strip():
            errors.append(f"outline {k} is empty")
        elif "\n" in o.strip():
            errors.append(f"outline {k} has more than one line")
    if not reply.conclusion.strip():
        errors.append("the conclusion is empty")
    for k, e in enumerate(reply.edits):
        if not 1 <= e.path <= num_paths:
            errors.append(f"edits[{k}]: path {e.path} does not exist (paths are 1..{num_paths})")
        if not e.find:
            errors.append(f"edits[{k}]: 'find' is empty")
    return errors


def parse_reply(kind: str, text: str, **context: Any) -> tuple[Any, list[str]]:
    """Extract, read and validate one reply: ``(plan, [])`` or ``(None, messages)``.

    ``kind`` is ``"summarise"`` (context ``num_units``), ``"parallelise"`` (context: the steps
    as ``steps=``, passed through ``validate_groups``) or ``"mapreduce"`` (``num_paths``, and
    ``outlines=``: the paths' step summaries, used when the reply gives no outlines).
    """
    from multiverse.curate import plan

    try:
        raw = extract_json(text)
        if kind == "summarise":
            steps = plan.steps_from_json(raw)
            errors = validate_steps(steps, context["num_units"])
            return (steps, []) if not errors else (None, errors)
        if kind == "parallelise":
            groups = plan.groups_from_json(raw)
            errors = validate_groups(groups, context["steps"])  # type: ignore[arg-type]
            return (groups, []) if not errors else (None, errors)
        block = plan.block_text_from_json(raw, context.get("outlines"))  # type: ignore[arg-type]
        errors = validate_block_text(block, context["num_paths"])
        return (block, []) if not errors else (None, errors)
    except PlanError as e:
        return None, [str(e)]
