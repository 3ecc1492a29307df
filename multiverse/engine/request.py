"""Branch and request state of the fork/join engine: plain Python, no tensors.

A request is a tree of branches. The root branch starts with the prompt; a fork (SPEC 4) gives a
branch one child per Outline, and the merge folds the children back into the parent.

Per branch, in canonical order (the order a trainer would see the text):
  * ``own_ids`` / ``own_pos`` / ``own_forced`` / ``own_logprobs``: the tokens this branch wrote
    (the root's start with the prompt). At a merge the children's lists are appended to the
    parent's, in outline order, so the root ends up holding the whole canonical output.
  * ``seq_ids()`` = the parent's first ``prefix_len`` sequence ids + ``own_ids``: every token the
    branch's K/V list covers. ``kv[j]`` is the pool slot of ``seq_ids()[j]`` for
    ``j < len(kv) = prefix_len + num_computed`` (the tokens after that are *pending*: known,
    positioned, not yet run through the model).
  * ``attend``: the slots the branch's last computed token attends (a subset of ``kv``, in order).
    The next token attends ``attend`` + itself unless its membership differs (a structural tag):
    then the engine asks :mod:`multiverse.format.layout` for the mask (``marks``, ``masked_until``).
  * ``state``: the branch's :class:`multiverse.format.layout.LayoutState`. Positions come only from
    it: ``own_pos[i] = state.step(tag)`` at append time, never recomputed elsewhere.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from multiverse.format.layout import LayoutState, layout_tags

if TYPE_CHECKING:
    from multiverse.format.layout import Layout


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


@dataclass(slots=True, eq=False)
class Branch:
    """One branch of a request (the root or a path); hashable by identity (a KV holder)."""

    request: Request
    state: LayoutState
    parent: Branch | None = None
    label: str = ""
    prefix_len: int = 0  # K/V entries inherited from the parent at the fork
    level: int = 0  # forked blocks this branch is nested in (root: 0)
    base_depth: int = 0  # state.depth at the fork: its own path's block is the innermost there
    status: Status = Status.RUNNING
    own_ids: list[int] = field(default_factory=list)
    own_pos: list[int] = field(default_factory=list)
    own_forced: list[bool] = field(default_factory=list)
    own_logprobs: list[float | None] = field(default_factory=list)
    max_pos: int = -1  # largest position among own_ids
    num_computed: int = 0
    attached: bool = True  # kv starts with the parent's prefix (roots: always)
    kv: list[int] = field(default_factory=list)
    attend: list[int] = field(default_factory=list)
    attend_version: int = 0  # bumped whenever ``attend`` is replaced rather than appended to
    masked_until: int = 0  # own index: chunks starting before it are computed with masks
    marks: list[int] = field(default_factory=list)  # own indices whose membership changed
    open_at: list[int] = field(default_factory=list)  # seq index of each open <Parallel>
    children: list[Branch] = field(default_factory=list)
    blocks: list[BlockRecord] = field(default_factory=list)
    cursor: int = -1  # test hook (forced output): next index into the request's forced ids
    cursor_end: int = -1
    seed: int = 0
    generator: Any = None  # the sampler's per-branch RNG, created lazily
    id: int = 0
    _layout: tuple[int, Layout] | None = None

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        return len(self.own_ids) - self.num_computed

    @property
    def resident(self) -> bool:
        """Holds K/V for every computed token (a preempted branch holds none)."""
        return self.attached and len(self.kv) == self.prefix_len + self.num_computed

    @property
    def seq_len(self) -> int:
        return self.prefix_len + len(self.own_ids)

    def seq_ids(self) -> list[int]:
        if self.parent is None:
            return list(self.own_ids)
        return self.parent.seq_ids()[: self.prefix_len] + self.own_ids

    def layout(self, length: int) -> Layout:
        """Layout (:func:`multiverse.format.layout.layout_tags`) of at least ``seq_ids()[:length]``;
        cached, since a prefix's layout never changes."""
        if self._layout is None or self._layout[0] < length:
            names = self.request.tag_names
            ids = self.seq_ids()
            self._layout = (len(ids), layout_tags([names.get(t) for t in ids]))
        return self._layout[1]

    def needs_mask(self, start: int, count: int) -> bool:
        """Must own tokens ``[start, start + count)`` be computed with a layout mask?"""
        if start < self.masked_until:
            return True
        return any(start <= m < start + count for m in self.marks)

    def preorder(self) -> list[Branch]:
        out, stack = [], [self]
        while stack:
            b = stack.pop()
            out.append(b)
            stack.extend(reversed(b.children))
        return out

    def path_label(self) -> tuple[str, ...]:
        out: list[str] = []
        b: Branch | None = self
        while b is not None and b.parent is not None:
            out.append(b.label)
            b = b.parent
        return tuple(reversed(out))

    # -- mutation --------------------------------------------------------------------------
    def append(self, token: int, *, forced: bool, logprob: float | None = None,
               mark: bool = True) -> int:  # fmt: skip
        """Append one token: step the layout state (tags per the request), record position and
        flags; returns the position. ``mark=False`` for the fork/join tokens whose visibility
        the engine sets itself (a child's ``<Path>``, the parent's ``<Conclusion>``)."""
        tag = self.request.tag_names.get(token)
        before_depth, before_members = self.state.depth, self.state.membership
        pos = self.state.step(tag)
        idx = len(self.own_ids)
        if mark and self.state.membership != before_members:
            self.marks.append(idx)
        if self.state.depth > before_depth:
            self.open_at.append(self.prefix_len + idx)
        elif self.state.depth < before_depth:
            del self.open_at[self.state.depth :]
        self.own_ids.append(token)
        self.own_pos.append(pos)
        if pos > self.max_pos:
            self.max_pos = pos
        self.own_forced.append(forced)
        self.own_logprobs.append(logprob)
        return pos

    def extend_merged(self, child: Branch) -> PathRecord:
        """Append a finished child's canonical tokens (bookkeeping only; K/V is the caller's)."""
        start = len(self.own_ids)
        self.own_ids += child.own_ids
        self.own_pos += child.own_pos
        self.own_forced += child.own_forced
        self.own_logprobs += child.own_logprobs
        self.max_pos = max(self.max_pos, child.max_pos)
        return PathRecord(child.label, start, len(self.own_ids), [b.shifted(start) for b in child.blocks])


@dataclass(slots=True, eq=False)
class Request:
    """One prompt's generation: the branch tree plus per-request counters."""

    id: int
    prompt_ids: list[int]
    params: Any  # SamplingParams
    tag_names: dict[int, str]  # token id -> tag; empty when parallel=False (tags are ordinary)
    root: Branch = field(init=False)
    finished: bool = False
    finish_reason: str | None = None
    num_generated: int = 0  # all branches, engine-inserted tokens included
    num_blocks: int = 0
    num_branches: int = 0
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_cached: bool = False
    gen_start: int = 0  # position after the prompt: depth is counted from here
    forced_ids: list[int] | None = None  # test hook: the output the "model" must write
    forced_layout: Layout | None = None
    stop_offset: int | None = None  # canonical output text is cut here (a stop string)
    t_arrival: float = 0.0
    t_finish: float = 0.0
    next_branch_id: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def parallel(self) -> bool:
        return bool(self.tag_names)

    def branches(self) -> list[Branch]:
        return self.root.preorder()

    def new_branch_id(self) -> int:
        self.next_branch_id += 1
        return self.next_branch_id
