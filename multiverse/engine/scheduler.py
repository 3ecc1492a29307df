"""Which branches run in the next step, with how many tokens, in which KV slots. Plain Python.

Continuous batching: every unfinished request's branches are candidates every step; new requests
join and finished ones leave between steps. A branch with pending tokens runs a chunk of them
(prompt prefill in chunks of ``prefill_chunk``, one token when decoding, the few tokens the engine
inserts at a fork or merge); all live branches of all requests decode in one batch.

Priority is (request arrival, branch pre-order in its tree): a parent before its children, path 1
before path 2. A request with ``serial_branches`` runs only its first runnable branch in that
order each step (path 1 to its end, then path 2, ...): the sequential baseline of one output.

When the pool is full the scheduler first evicts the prefix cache, then preempts the
lowest-priority branch that holds K/V (its slots are released, its tokens kept, and it is
recomputed later from its own tokens with the layout rule's mask: same positions, same results),
evicting the cache again after each preempted root: its prompt slots, shared with the cache,
become free only then.
Taking the last branch in pre-order first means a parent goes only after all its descendants:
whole families are preempted. A branch never preempts one of higher priority, so the highest
one always progresses; if even it cannot get a single slot, its request alone exceeds the pool
and is finished early (``finish_reason="kv_capacity"``) rather than hang.

Admission: a branch that starts from nothing (a new request, a preempted root or child) behind
branches that run in this step starts only if all its pending tokens fit beside one more slot
for each of those (in the free slots, the cache's evictable ones and the slots only branches of
lower priority hold); otherwise it waits. Started into a pool those branches are about to need,
it would be preempted again at once: every step it recomputed its tokens and was preempted (19
preemptions where 1 is needed, issue 28's recipe). The first branch in order always runs.

A root's prompt starts from the prefix cache (:mod:`.reuse`: its flat prefix; in a structured
prompt, the cached runs of its paths too, the chunks stopping where one begins).

The scheduler writes no branch field itself: it makes the KVManager calls (allocate, share,
release) and tells the branch through :mod:`.request` (``take_slots``, ``adopt_cached_prefix``,
``reattach``, ``preempt``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from multiverse.engine.kv_manager import KVManager
from multiverse.engine.radix import RadixCache
from multiverse.engine.request import Branch, Request, Status
from multiverse.engine.reuse import prefill_from_cache

EVICT_SHARE = 64
"""An eviction frees at least ``1 / EVICT_SHARE`` of the pool: each call walks the whole cache,
and once the cache fills the pool (finished outputs do, in a long-running server) evicting only
one step's shortfall would walk it every step."""


@dataclass(slots=True)
class Work:
    """One branch's share of a step: own tokens ``[start, start + count)`` into ``slots``."""

    branch: Branch
    start: int
    count: int
    slots: list[int]
    masked: bool  # computed with the layout rule's mask over all of ``branch.kv``
    completes: bool  # the branch has no pending tokens after this chunk
    prompt_rows: list[int] = field(default_factory=list)  # chunk rows whose logits give prompt logprobs


class Scheduler:
    def __init__(self, kv: KVManager, radix: RadixCache | None, max_batch_tokens: int = 2048,
                 prefill_chunk: int = 512) -> None:  # fmt: skip
        if max_batch_tokens < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_tokens and prefill_chunk must be >= 1")
        self.kv = kv
        self.radix = radix
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.num_preemptions = 0

    def schedule(self, requests: list[Request]) -> list[Work]:
        order = [b for r in requests if not r.finished for b in r.branches()]
        budget = self.max_batch_tokens
        works: list[Work] = []
        serial_busy: set[int] = set()  # requests with serial_branches that already run a branch
        for i, br in enumerate(order):
            if budget <= 0:
                break
            if br.num_pending == 0 or br.status is Status.FINISHED or not _ready(br):
                continue
            starts = br.num_computed == 0 and (br.parent is None or not br.attached)
            if starts and works and not self._fits(br, len(works), order[i + 1 :]):
                continue  # it would be preempted as soon as the branches ahead grow: it waits
            serial = br.request.params.serial_branches
            if serial and br.request.id in serial_busy:
                continue
            if not br.attached:  # a preempted child takes the (recomputed) prefix back
                parent = br.parent
                assert parent is not None
                prefix = parent.kv[: br.prefix_len]
                self.kv.share(br, prefix)
                br.reattach(prefix)
            n = min(br.num_pending, budget, self.prefill_chunk)
            if br.parent is None and br.num_computed < br.request.prompt_len:
                limit = prefill_from_cache(self.radix, self.kv, br)  # the chunk stops where a path's run is cached
                n = min(br.num_pending, budget, self.prefill_chunk, limit or n)
            if not self._make_room(n, order[i + 1 :]):
                continue
            n = min(n, self.kv.num_free)
            works.append(self._take(br, n))
            budget -= n
            if serial:
                serial_busy.add(br.request.id)
        return works

    def _take(self, br: Branch, n: int) -> Work:
        req, start = br.request, br.num_computed
        slots = self.kv.allocate(br, n)
        masked = req.parallel and br.needs_mask(start, n)
        br.take_slots(slots, masked=masked)
        rows: list[int] = []
        if br.parent is None and req.params.prompt_logprobs:
            rows = list(range(max(0, min(n, req.prompt_len - 1 - start))))
        return Work(br, start, n, slots, masked, br.num_pending == 0, rows)

    def _make_room(self, n: int, lower: list[Branch]) -> bool:
        """Free slots until ``n`` are free (or at least one): evict the prefix cache, then
        preempt branches of lower priority, last first, evicting again after each root (its
        cached prompt slots become evictable only once it lets go of them; its children go
        before it and hold nothing the root does not).
        False if not even one slot is free."""
        if self._evict(n):
            return True
        for victim in reversed(lower):
            if self.kv.held(victim):
                self.preempt(victim)
                if victim.parent is None and self._evict(n):  # only a root holds cached slots
                    return True
                if self.kv.num_free >= n:
                    return True
        return self.kv.num_free > 0

    def _fits(self, br: Branch, reserve: int, lower: list[Branch]) -> bool:
        """Whether ``br``'s pending tokens and ``reserve`` more slots fit in the free slots, the
        prefix cache's evictable ones and those that only branches in ``lower`` hold."""
        need = br.num_pending + reserve
        if self.kv.num_free >= need:  # before the prefix cache's count, which walks the cache
            return True
        room = self.kv.num_free + (self.radix.evictable_slots() if self.radix is not None else 0)
        if room >= need:
            return True
        holds = Counter(s for v in lower for s in self.kv.held(v))
        return room + sum(1 for s, c in holds.items() if self.kv.refcount(s) == c) >= need

    def _evict(self, n: int) -> bool:
        """Evict cached prefixes until ``n`` slots are free (at least :data:`EVICT_SHARE` of the
        pool at once); True if they are."""
        if self.kv.num_free < n and self.radix is not None:
            self.radix.evict(max(n - self.kv.num_free, self.kv.num_slots // EVICT_SHARE))
        return self.kv.num_free >= n

    def preempt(self, br: Branch) -> None:
        """Release ``br``'s K/V; it keeps its tokens and is recomputed when it runs again."""
        self.kv.release_if_held(br)
        br.preempt()
        self.num_preemptions += 1


def _ready(br: Branch) -> bool:
    """A child can run once its parent's K/V (its prefix) is all there."""
    p = br.parent
    return p is None or (p.resident and p.num_pending == 0)
