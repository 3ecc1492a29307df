"""Value types of a request's branch tree: the branch status and the records of merged blocks.

Status: a branch RUNNING samples; after ``</Goal>`` it is FORKING, then WAITING for its children
(or RUNNING again if the fork is refused) and RUNNING after the merge. A child ends RUNNING ->
CLOSING -> ENDED and is merged; the root of a finished request is FINISHED.

A :class:`BlockRecord` is one forked ``<Parallel>`` block of the canonical output: its paths
(:class:`PathRecord`) in outline order, each an index range into the owner's ``own_ids``
(shifted as the owner is merged into its own parent). The output tree is built from them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    RUNNING = "running"  # samples a token once its pending tokens are computed
    FORKING = "forking"  # wrote </Goal> "\n": forks (or continues) once they are computed
    CLOSING = "closing"  # a child writing its closing "</Path>\n"; then ENDED
    WAITING = "waiting"  # a parent waiting for its children
    ENDED = "ended"  # a child whose path is complete, waiting for the merge
    FINISHED = "finished"  # the root of a finished request


@dataclass(slots=True)
class PathRecord:
    """One merged path, by index range into the owner's ``own_ids``."""

    label: str
    start: int
    end: int
    blocks: list[BlockRecord] = field(default_factory=list)

    def shifted(self, offset: int) -> PathRecord:
        return PathRecord(self.label, self.start + offset, self.end + offset,
                          [b.shifted(offset) for b in self.blocks])  # fmt: skip

    def to_dict(self, offset: int = 0) -> dict[str, Any]:
        return {"label": self.label, "start": self.start - offset, "end": self.end - offset,
                "blocks": [b.to_dict(offset) for b in self.blocks]}  # fmt: skip


@dataclass(slots=True)
class BlockRecord:
    """One forked ``<Parallel>`` block: its paths in outline order."""

    paths: list[PathRecord]

    @property
    def start(self) -> int:
        return self.paths[0].start

    @property
    def end(self) -> int:
        return self.paths[-1].end

    def shifted(self, offset: int) -> BlockRecord:
        return BlockRecord([p.shifted(offset) for p in self.paths])

    def to_dict(self, offset: int = 0) -> dict[str, Any]:
        return {"start": self.start - offset, "end": self.end - offset,
                "paths": [p.to_dict(offset) for p in self.paths]}  # fmt: skip
