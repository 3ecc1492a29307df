"""The layout rule's state walker (SPEC.md section 3), token by token: :class:`LayoutState`.

Pure Python (no torch), so that what needs only positions (``multiverse inspect``'s depth) does
not import torch; :mod:`multiverse.format.layout` re-exports it and builds the per-token
:class:`~multiverse.format.layout.Layout` and the masks from it. One rule, used by the trainer,
the engine and ``inspect``: there is no second implementation anywhere in the project.

Block levels are well defined: ``<Path>`` and ``<Conclusion>`` only change the innermost open
block, so while a block is open the blocks around it keep their phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

GOAL, PATHS, CONCLUSION = "goal", "paths", "conclusion"


@dataclass(slots=True)
class _OpenBlock:
    block_id: int
    phase: str = GOAL
    start: int = -1  # position of the block's paths' first token (s)
    max_end: int = -1  # last position used by any finished path
    path: int = -1  # index of the current path


@dataclass(slots=True)
class LayoutState:
    """Incremental layout of one sequence (or one branch of a generation in progress).

    ``step(tag)`` returns the position the next token gets; ``membership`` is that token's
    ``((block_id, path_index), ...)`` from outermost to innermost level.
    """

    next_pos: int = 0
    stack: list[_OpenBlock] = field(default_factory=list)
    next_block_id: int = 0
    membership: tuple[tuple[int, int], ...] = ()

    # -- queries ---------------------------------------------------------------------------
    @property
    def phase(self) -> str | None:
        """Phase of the innermost open block: "goal" | "paths" | "conclusion" | None."""
        return self.stack[-1].phase if self.stack else None

    @property
    def depth(self) -> int:
        """Number of open ``<Parallel>`` blocks."""
        return len(self.stack)

    def clone(self) -> LayoutState:
        return LayoutState(
            self.next_pos,
            [_OpenBlock(b.block_id, b.phase, b.start, b.max_end, b.path) for b in self.stack],
            self.next_block_id,
            self.membership,
        )

    # -- the rule --------------------------------------------------------------------------
    def step(self, tag: str | None) -> int:
        """Consume one token (``tag`` = one of :data:`TAGS`, or None for any other token) and
        return its position id. ``self.membership`` is then that token's membership."""
        pos = self.next_pos
        top = self.stack[-1] if self.stack else None
        if tag == "<Parallel>":
            self.next_pos = pos + 1
            self.stack.append(_OpenBlock(self.next_block_id))
            self.next_block_id += 1
            return pos  # the tag belongs to the enclosing context: membership unchanged
        if tag == "<Path>" and top is not None and top.phase != CONCLUSION:
            if top.phase == GOAL:
                top.phase, top.start, top.path = PATHS, pos, 0
            else:
                top.max_end = max(top.max_end, self.next_pos - 1)
                pos, top.path = top.start, top.path + 1
            self._remember()
        elif tag == "<Conclusion>" and top is not None and top.phase == PATHS:
            top.max_end = max(top.max_end, self.next_pos - 1)
            pos, top.phase = top.max_end + 1, CONCLUSION
            self._remember()
        elif tag == "</Parallel>" and top is not None:
            if top.phase == PATHS:  # closed without a Conclusion: merge here all the same
                top.max_end = max(top.max_end, self.next_pos - 1)
                pos = top.max_end + 1
            self.stack.pop()
            self._remember()
        self.next_pos = pos + 1
        return pos

    def skip(self, n: int) -> int:
        """Consume ``n`` ordinary tokens (as ``n`` calls of ``step(None)``); the last one's position."""
        self.next_pos += n
        return self.next_pos - 1

    def _remember(self) -> None:
        self.membership = tuple((b.block_id, b.path) for b in self.stack if b.phase == PATHS)

    # -- fork / join (the engine's Map and Reduce) -----------------------------------------
    def fork(self, n: int) -> list[LayoutState]:
        """States for ``n`` child branches of the innermost block, which must be in phase goal
        (call after the ``\\n`` that follows ``</Goal>``). Child ``i`` is ready to
        ``step("<Path>")`` as path ``i``, at the position the full-sequence rule gives it."""
        if not self.stack or self.stack[-1].phase != GOAL:
            raise ValueError(f"fork needs an open block in phase goal (phase is {self.phase})")
        if n < 1:
            raise ValueError("fork needs at least one child")
        children = []
        for i in range(n):
            child = self.clone()
            top = child.stack[-1]
            top.phase, top.start, top.path, top.max_end = PATHS, self.next_pos, i - 1, self.next_pos - 1
            child._remember()
            children.append(child)
        return children

    def join(self, children: Sequence[LayoutState]) -> LayoutState:
        """The parent's state after all ``children`` (from :meth:`fork`) ended; its next
        ``step("<Conclusion>")`` gets ``1 + max`` over the children of their last position."""
        if not children:
            raise ValueError("join needs the children's states")
        depth = self.depth
        for c in children:
            if c.depth != depth or c.phase != PATHS:
                raise ValueError(
                    f"a child branch still has a nested block open (depth {c.depth}, parent {depth})"
                )
        parent = self.clone()
        top = parent.stack[-1]
        top.phase, top.path = PATHS, len(children) - 1
        top.start = children[0].stack[-1].start
        top.max_end = max(max(c.stack[-1].max_end, c.next_pos - 1) for c in children)
        parent.next_pos = top.max_end + 1
        parent.next_block_id = max(c.next_block_id for c in children)
        parent._remember()
        return parent
