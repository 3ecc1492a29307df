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

Ownership: the fields of a :class:`Branch` and a :class:`Request` are written only by the methods
of this module (``take_slots``, ``adopt_cached_prefix``, ``reattach``, ``preempt``, ``release_kv``,
``set_attend``, ``fork``, ``merge_children``, ``fold_children``, the status transitions,
``Request.create`` / ``finish``...). The scheduler, :mod:`.forkjoin` and the
:class:`~multiverse.engine.llm.LLM` read the state, call these methods, and make the matching
:class:`~multiverse.engine.kv_manager.KVManager` calls (share / allocate / release) themselves.
:meth:`Request.check_invariants` checks the result (:mod:`.invariants`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from multiverse.engine.invariants import check_request
from multiverse.engine.records import BlockRecord, PathRecord, Status
from multiverse.format.layout import LayoutState, layout_tags

if TYPE_CHECKING:
    from multiverse.engine.kv_manager import KVManager
    from multiverse.format.layout import Layout

__all__ = ["BlockRecord", "Branch", "PathRecord", "Request", "Status"]


@dataclass(slots=True, eq=False, repr=False)
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
    cuts: list[tuple[int, int, str]] = field(default_factory=list)  # stop strings: own_ids[a:b] reads as text
    cursor: int = -1  # test hook (forced output): next index into the request's forced ids
    cursor_end: int = -1
    seed: int = 0
    id: int = 0
    _layout: tuple[int, Layout] | None = None

    def __repr__(self) -> str:
        path = ".".join(self.path_label()) or "root"
        return f"Branch(request {self.request.id}, id {self.id}, {path}, {self.status.value})"

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

    def children_slots(self) -> list[int]:
        """The children's own slots (after their prefix), in outline order: what a merge adds."""
        return [s for c in self.children for s in c.kv[c.prefix_len :]]

    # -- tokens ----------------------------------------------------------------------------
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

    def append_generated(self, token: int, *, forced: bool, logprob: float | None = None,
                         mark: bool = True) -> int:  # fmt: skip
        """:meth:`append` a generated token (sampled or engine-inserted): it counts in the
        request's ``num_generated`` and advances the forced-output cursor when it matches."""
        pos = self.append(token, forced=forced, logprob=logprob, mark=mark)
        req = self.request
        req.num_generated += 1
        ids = req.forced_ids
        if ids is not None and self.cursor < self.cursor_end and ids[self.cursor] == token:
            self.cursor += 1
        return pos

    def extend_merged(self, child: Branch) -> PathRecord:
        """Append a finished child's canonical tokens (bookkeeping only; K/V is the caller's)."""
        start = len(self.own_ids)
        self.own_ids += child.own_ids
        self.own_pos += child.own_pos
        self.own_forced += child.own_forced
        self.own_logprobs += child.own_logprobs
        self.max_pos = max(self.max_pos, child.max_pos)
        self.cuts += [(a + start, b + start, text) for a, b, text in child.cuts]
        return PathRecord(child.label, start, len(self.own_ids), [b.shifted(start) for b in child.blocks])

    def cut_at_stop(self, start: int, end: int, text: str) -> None:  # the tokens stay (.stops)
        """A stop string: ``own_ids[start:end]`` (the run that completed it) reads as ``text``."""
        self.cuts.append((start, end, text))

    # -- K/V (the caller makes the matching KVManager call) ----------------------------------
    def take_slots(self, slots: list[int], *, masked: bool) -> None:
        """The next ``len(slots)`` pending tokens are computed into ``slots`` this step. An
        unmasked chunk extends ``attend`` (causal); a masked chunk's ``attend`` comes from the
        runner (:meth:`set_attend`)."""
        if not self.resident or len(slots) > self.num_pending:
            raise AssertionError(f"{self}: cannot take {len(slots)} slots ({self.num_pending} pending)")
        end = self.num_computed + len(slots)
        self.kv += slots
        if not masked:
            self.attend += slots
        self.num_computed = end
        if self.marks and self.marks[0] < end:
            self.marks = [m for m in self.marks if m >= end]

    def adopt_cached_prefix(self, slots: list[int]) -> None:
        """A root's next ``len(slots)`` prompt tokens come from the prefix cache: a flat prefix at
        the start, later a path's run (:mod:`.reuse`), which a masked chunk follows (sets ``attend``)."""
        c, end = self.num_computed, self.num_computed + len(slots)
        limit = min(self.request.prompt_len, self.masked_until) if c else self.request.prompt_len
        if self.parent is not None or not self.resident or end >= limit:
            raise AssertionError(f"{self}: cannot adopt {len(slots)} cached slots after {c} computed")
        self.kv += slots
        if not c:
            self.attend, self.attend_version = list(slots), self.attend_version + 1
        self.num_computed = end

    def reattach(self, prefix: list[int]) -> None:
        """A preempted child takes its (recomputed) parent's first ``prefix_len`` slots back; its
        own tokens are then recomputed with the layout mask (``masked_until``)."""
        if self.attached or len(prefix) != self.prefix_len:
            raise AssertionError(f"{self}: reattach with {len(prefix)} slots, prefix_len {self.prefix_len}")
        self.kv, self.attend, self.attached = list(prefix), [], True
        self.attend_version += 1

    def preempt(self) -> None:
        """Forget all K/V (already released); the tokens stay and are recomputed from scratch,
        with the layout mask, when the branch runs again. A child detaches from its prefix."""
        self.kv, self.attend, self.num_computed, self.marks = [], [], 0, []
        self.attend_version += 1
        self.attached = self.parent is None
        if self.request.parallel:
            self.masked_until = len(self.own_ids)

    def release_kv(self) -> None:
        """Forget all K/V (already released) of a branch that is done: merged or finished."""
        self.kv, self.attend = [], []
        self.attached = self.parent is None

    def set_attend(self, slots: list[int]) -> None:
        """Replace ``attend`` (what the runner's layout mask gave the chunk's last token)."""
        self.attend = slots
        self.attend_version += 1

    # -- status transitions ----------------------------------------------------------------
    def _move(self, to: Status, *allowed: Status) -> None:
        if self.status not in allowed:
            raise AssertionError(f"{self}: {self.status.value} -> {to.value} is not a transition")
        self.status = to

    def start_fork(self) -> None:  # wrote </Goal> "\n": fork (or not) once they are computed
        self._move(Status.FORKING, Status.RUNNING)

    def fork_refused(self) -> None:  # the branch samples on, sequentially
        self._move(Status.RUNNING, Status.FORKING)

    def start_closing(self) -> None:  # a child writes its last tokens ("</Path>\n"), then ends
        self._move(Status.CLOSING, Status.RUNNING)

    def end_path(self) -> None:  # its closing tokens are computed: wait for the merge
        self._move(Status.ENDED, Status.CLOSING)

    # -- fork / join -----------------------------------------------------------------------
    def fork(self, labels: Sequence[str], states: Sequence[LayoutState], seeds: Sequence[int],
             cursors: Sequence[tuple[int, int]], resume: int) -> list[Branch]:  # fmt: skip
        """Wait for one new child per label; child ``i`` lists all of this branch's slots and
        attends what it attends. Returns the children (the caller shares the K/V with them and
        appends their start tokens). ``cursors`` / ``resume``: the forced-output test hook."""
        self._move(Status.WAITING, Status.FORKING)
        req = self.request
        for label, state, seed, (c0, c1) in zip(labels, states, seeds, cursors, strict=True):
            child = Branch(req, state, parent=self, label=label, prefix_len=len(self.kv), level=self.level + 1,
                           base_depth=self.state.depth, open_at=list(self.open_at), cursor=c0, cursor_end=c1,
                           seed=seed, id=req.new_branch_id(), kv=list(self.kv), attend=list(self.attend))  # fmt: skip
            self.children.append(child)
        self.cursor = resume
        req.num_blocks += 1
        req.num_branches += len(labels)
        return list(self.children)

    def merge_children(self) -> list[Branch]:
        """Reduce: every child has ENDED and holds its K/V. The children's tokens and slots are
        appended in outline order (the caller has shared :meth:`children_slots` with this
        branch), the layout states joined; returns the children, for the caller to release."""
        kids = self.children
        if self.status is not Status.WAITING or not self.resident or self.num_pending:
            raise AssertionError(f"{self}: not a resident waiting parent")
        if any(c.status is not Status.ENDED or c.num_pending or not c.resident for c in kids):
            raise AssertionError(f"{self}: merge before every child ended with its K/V")
        moved = self.children_slots()
        self.state = self.state.join([c.state for c in kids])
        self.blocks.append(BlockRecord([self.extend_merged(c) for c in kids]))
        self.kv += moved
        self.attend += moved
        self.num_computed = len(self.own_ids)
        self.children = []
        self._move(Status.RUNNING, Status.WAITING)
        return kids

    def fold_children(self) -> list[Branch]:
        """Fold unmerged children (recursively) into this branch's output, as recorded paths;
        returns the folded branches in the order they are to be released (each after its
        own descendants)."""
        if not self.children:
            return []
        done: list[Branch] = []
        paths = []
        for c in self.children:
            done += c.fold_children()
            paths.append(self.extend_merged(c))
            done.append(c)
        self.children = []
        self.blocks.append(BlockRecord(paths))
        return done


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
    error: str | None = None  # finish_reason "error": what went wrong
    num_generated: int = 0  # all branches, engine-inserted tokens included
    num_blocks: int = 0
    num_branches: int = 0
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_cached: bool = False
    gen_start: int = 0  # position after the prompt: depth is counted from here
    forced_ids: list[int] | None = None  # test hook: the output the "model" must write
    forced_layout: Layout | None = None
    stop_offset: int | None = None  # -1: a stop string in the root ended it (its text: root.cuts)
    ended_by: tuple[int, float | None] | None = None  # (token, logprob) sampled, not kept, that ended it
    t_arrival: float = 0.0
    t_finish: float = 0.0
    next_branch_id: int = 0

    @classmethod
    def create(cls, id: int, prompt_ids: Sequence[int], params: Any, tag_names: dict[int, str], *, seed: int,
               forced_ids: Sequence[int] | None = None, t_arrival: float = 0.0) -> Request:  # fmt: skip
        """A new request whose root branch holds the prompt (nothing computed yet). A prompt
        with Multiverse structure is prefilled with the layout's mask. ``forced_ids``: the test
        hook, the output the "model" writes instead of sampling."""
        req = cls(id, list(prompt_ids), params, tag_names, t_arrival=t_arrival)
        root = req.root = Branch(req, LayoutState(), seed=seed)
        for t in req.prompt_ids:
            root.append(t, forced=False)
        if root.marks:
            root.masked_until, root.marks = len(req.prompt_ids), []
        req.gen_start = root.state.next_pos
        req.prompt_logprobs = [None] * len(req.prompt_ids)
        if forced_ids is not None:
            req.forced_ids = list(forced_ids)
            req.forced_layout = layout_tags([tag_names.get(t) for t in req.prompt_ids + req.forced_ids])
            root.cursor, root.cursor_end = 0, len(req.forced_ids)
        return req

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

    def set_prompt_logprobs(self, start: int, values: Sequence[float]) -> None:
        """Logprobs of prompt tokens ``start, start + 1, ...``."""
        self.prompt_logprobs[start : start + len(values)] = values

    def mark_prompt_cached(self) -> None:
        self.prompt_cached = True

    def finish(self, reason: str, cut_stop: bool = False, error: str | None = None,
               ended_by: tuple[int, float | None] | None = None) -> None:  # fmt: skip
        """Mark finished (the root has no children left: :meth:`Branch.fold_children`); ``cut_stop``:
        the text is cut at the stop string; ``error``: the message; ``ended_by``: the sampled token
        (and logprob) that ended it, left out of the output (a stop id, EOS, a malformed token)."""
        if self.root.children:
            raise AssertionError(f"request {self.id} finished with unfolded children")
        self.finished, self.finish_reason, self.error, self.ended_by = True, reason, error, ended_by
        self.root.status = Status.FINISHED
        if cut_stop:
            self.stop_offset = -1

    def set_finish_time(self, t: float) -> None:
        self.t_finish = t

    def check_invariants(self, kv: KVManager) -> None:
        """Raise ``AssertionError`` naming the first broken invariant (:mod:`.invariants`)."""
        check_request(self, kv)
