"""The block skeleton built in code from a validated step tree and its parallel groups.

A skeleton is a list of items: a unit number (``int``, 1-based) or a :class:`SkBlock`. A group
of top-level steps becomes a top-level block with one :class:`SkPath` per step; a group of
sub-steps becomes a block inside its parent's path (depth 2) or, when the parent is not in a
group, a block at the top level. An ungrouped step contributes its units as plain items.

Invariants: the unit numbers of a skeleton, read in document order, are exactly
``1..num_units`` once each (nothing dropped, nothing repeated); depth is at most 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

from multiverse.curate.plan import Group, Step


@dataclass(slots=True)
class SkPath:
    items: list[SkItem] = field(default_factory=list)

    def units(self) -> list[int]:
        """The unit numbers directly in this path (not those of nested blocks)."""
        return [x for x in self.items if isinstance(x, int)]


@dataclass(slots=True)
class SkBlock:
    paths: list[SkPath] = field(default_factory=list)
    outlines: list[str] = field(default_factory=list)
    conclusion: str = ""
    steps: list[str] = field(default_factory=list)  # the step ids of its paths


SkItem = Union[int, SkBlock]


def _step_items(step: Step, grouped_subs: dict[str, list[str]]) -> list[SkItem]:
    if not step.substeps:
        return list(range(step.start, step.end + 1))
    return _sequence(step.substeps, grouped_subs, nested=True)


def _sequence(steps: list[Step], group_of: dict[str, list[str]], nested: bool) -> list[SkItem]:
    """Items for a run of sibling steps: each group a block, the rest plain units."""
    out: list[SkItem] = []
    k = 0
    while k < len(steps):
        s = steps[k]
        ids = group_of.get(s.id)
        if ids and ids[0] == s.id:
            members = steps[k : k + len(ids)]
            block = SkBlock(steps=list(ids))
            for m in members:
                items = list(range(m.start, m.end + 1)) if nested else _step_items(m, group_of)
                block.paths.append(SkPath(items))
            out.append(block)
            k += len(ids)
            continue
        out.extend(list(range(s.start, s.end + 1)) if nested else _step_items(s, group_of))
        k += 1
    return out


def build(steps: list[Step], groups: list[Group]) -> list[SkItem]:
    """The skeleton of a validated plan (see the module docstring)."""
    group_of = {sid: g.steps for g in groups for sid in g.steps}
    return _sequence(steps, group_of, nested=False)


def iter_blocks(items: list[SkItem], depth: int = 1) -> Iterator[tuple[int, SkBlock]]:
    """Every block with its depth, innermost first (post-order): the Map/Reduce order."""
    for x in items:
        if isinstance(x, SkBlock):
            for p in x.paths:
                yield from iter_blocks(p.items, depth + 1)
            yield depth, x


def unit_order(items: list[SkItem]) -> list[int]:
    """Unit numbers in document order (the invariant: ``1..n``)."""
    out: list[int] = []
    for x in items:
        if isinstance(x, int):
            out.append(x)
        else:
            for p in x.paths:
                out.extend(unit_order(p.items))
    return out


def paths_per_block(items: list[SkItem]) -> list[int]:
    """Paths per block in document order (pre-order), as :func:`grammar.stats` counts them."""
    out: list[int] = []
    for x in items:
        if isinstance(x, SkBlock):
            out.append(len(x.paths))
            for p in x.paths:
                out.extend(paths_per_block(p.items))
    return out
