"""Prefill from the prefix cache: a prompt's flat prefix, then the cached K/V of its paths.

The flat rule (:mod:`.radix`): the K/V of token ``i`` depends on ids ``0..i`` only, so a root
adopts the longest cached prefix of its prompt. A structured prompt (the remote driver's Reduce
request: prefix + path 1 + path 2 + ... + ``<Conclusion>``) gets more: by the layout rule a path
``k`` of a block sees only the tokens before the block's first path (at outer levels in phase
paths, only its own path there) and itself, and starts at the block's paths' start position,
whatever paths come before it. Those are exactly the ids and positions of *its own* request's
sequence, ``context + path k`` (the driver's path request, :meth:`Branch.seq_ids` of the path),
so the K/V that request computed (cached when it finished) is the K/V a structured prefill
computes for path ``k``'s tokens. :func:`path_runs` finds each path's segment and context in a
prompt; :func:`prefill_from_cache`, called by the scheduler before each chunk of a root's
prompt, adopts what the cache holds at the root's next token (the flat prefix at the start, else
the longest cached run of a path segment that contains it) and returns how many tokens to
compute before the next path start whose run is cached, so the chunk stops there.

Limits, by design: a run never goes past its path's segment (``<Path>`` up to the block's next
``<Path>``, ``<Conclusion>`` or ``</Parallel>``: the tokens after it see other paths), nor past
the prompt's second-to-last token (its last is computed for the logits); adopted runs and
computed gaps alternate (a path request does not compute the ``</Path>`` it stopped at: the
Reduce computes ``</Path>\\n`` of each path, masked, between the runs); a run never lists a slot
the root lists already (a branch lists a slot once: paths 2..n's requests hit path 1's
``<Path>\\n``, which the Reduce computes again for them). Mid-prompt runs are taken
only in the parallel namespace and where the prompt is computed with the layout mask (a mask
chunk follows each run and sets ``attend``); none for requests with prompt logprobs. Nested
blocks follow from the same rule: a nested path's context skips the other paths of every block
around it, and a path whose nested blocks were merged by its own Reduce request is cached whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multiverse.format.layout_state import CONCLUSION, GOAL, PATHS, LayoutState

if TYPE_CHECKING:
    from multiverse.engine.kv_manager import KVManager
    from multiverse.engine.radix import RadixCache
    from multiverse.engine.request import Branch


@dataclass(slots=True)
class PathRun:
    """One path's segment ``ids[start:end]`` and the ranges of ``ids`` it sees before itself."""

    start: int
    end: int
    context: tuple[tuple[int, int], ...]

    def key(self, ids: Sequence[int], stop: int) -> list[int]:
        """The path's own request's sequence: its context + its segment, cut at ``stop``."""
        out = [t for a, b in self.context for t in ids[a:b]]
        return out + list(ids[self.start : min(self.end, stop)])

    def context_len(self) -> int:
        return sum(b - a for a, b in self.context)


def path_runs(ids: Sequence[int], tag_names: dict[int, str]) -> list[PathRun]:
    """Every path segment of ``ids`` by the layout rule, in order of its start."""
    state, runs = LayoutState(), []
    blocks: list[
        list[int]
    ] = []  # per open block: [its first path's start, its current run's index]

    def close(blk: list[int], i: int) -> None:
        if blk[1] >= 0:
            runs[blk[1]].end, blk[1] = i, -1

    for i, t in enumerate(ids):
        depth = state.depth
        top = state.stack[-1] if depth else None
        phase, path = (top.phase, top.path) if top is not None else (None, None)
        state.step(tag_names.get(t))
        if state.depth > depth:
            blocks.append([-1, -1])
        elif state.depth < depth:
            close(blocks.pop(), i)
        elif top is not None and top.phase == PATHS and (phase == GOAL or top.path != path):
            blk = blocks[-1]
            close(blk, i)
            if blk[0] < 0:
                blk[0] = i
            context, cursor = [], 0
            for b, open_block in zip(blocks[:-1], state.stack[:-1], strict=True):
                if open_block.phase == PATHS:  # the other paths of that block are not visible
                    context.append((cursor, b[0]))
                    cursor = runs[b[1]].start
            context.append((cursor, blk[0]))
            blk[1] = len(runs)
            runs.append(PathRun(i, len(ids), tuple(context)))
        elif top is not None and top.phase == CONCLUSION and phase == PATHS:
            close(blocks[-1], i)
    return runs


def prefill_from_cache(radix: RadixCache | None, kv: KVManager, root: Branch) -> int | None:
    """Adopt the cached K/V for ``root``'s next prompt tokens (module docstring); returns how
    many tokens the next chunk may compute before a cached path run begins (None: no limit)."""
    req = root.request
    stop = req.prompt_len - 1  # the last prompt token is computed: its logits sample
    if radix is None or req.params.prompt_logprobs or root.num_computed >= stop:
        return None
    ids, ns = req.prompt_ids, req.parallel
    if root.num_computed == 0:
        _adopt(kv, root, radix.match(ids[:stop], namespace=ns))
    if not req.parallel or root.masked_until < req.prompt_len:
        return None
    runs, held = path_runs(ids, req.tag_names), set(root.kv)
    while root.num_computed < stop:
        c, best, ahead = root.num_computed, (0, None), None
        for r in runs:
            if r.end <= c or r.start >= stop:
                continue
            a, n = _cached_run(radix, ids, ns, r, max(c, r.start), stop, held)
            if n and a == c and n > best[0]:
                best = (n, r)
            elif n and a > c:
                ahead = a if ahead is None else min(ahead, a)
        n, r = best
        if r is None:
            return None if ahead is None else ahead - c
        slots = radix.match(
            r.key(ids, c + n), namespace=ns, skip=r.context_len() + c - r.start, query=False
        )
        _adopt(kv, root, slots)
        held.update(slots)
    return None


def _cached_run(radix: RadixCache, ids: Sequence[int], ns: bool, r: PathRun, frm: int, stop: int,
                held: set[int]) -> tuple[int, int]:  # fmt: skip
    """The run of path ``r``'s segment, from ``frm`` on, whose K/V the cache holds and the root
    does not already list: (its start, its length; 0 if none). The root may list some: path
    requests share their common start (``<Path>\n``, the first one's K/V), which the merged
    prompt has once per path."""
    slots = radix.peek(r.key(ids, stop), namespace=ns)[r.context_len() + frm - r.start :]
    i = 0
    while i < len(slots) and slots[i] in held:
        i += 1
    j = i
    while j < len(slots) and slots[j] not in held:
        j += 1
    return frm + i, j - i


def _adopt(kv: KVManager, root: Branch, slots: list[int]) -> None:
    if slots:
        kv.share(root, slots)
        root.adopt_cached_prefix(slots)
