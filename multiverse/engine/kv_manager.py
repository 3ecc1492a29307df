"""Reference-counted allocator of KV-pool slots (token granularity). Pure Python, no torch.

The pool (:class:`multiverse.engine.model.KVPool`) holds one token's K/V per slot; this module only
decides who holds which slot. A *holder* is any hashable key: a branch, a radix-cache node.

Contract:
  * ``allocate(holder, n)`` hands out ``n`` free slots, each with reference count 1, held by
    ``holder``.
  * ``share(holder, slots)`` adds one reference per slot for ``holder`` (a fork: the children
    hold references to the parent's slots; a prefix-cache hit: the request holds the node's).
    No K/V is copied, ever.
  * ``release(holder)`` drops every reference ``holder`` has; a slot whose count reaches 0 goes
    back to the free list. Releasing an unknown holder raises (no double free).
  * ``transfer(src, dst, slots)`` moves references between holders without touching counts.

Runs (locality, not semantics): a holder's slots are handed out in runs of consecutive slots, so a
sequence that decodes beside others (16 requests in lockstep each take one slot a step) reads its
K/V from consecutive pool rows, not from rows 16 slots apart (one new page per key on a small
model). ``allocate`` carves a run of the asked slots plus ``run`` more from the free list and
keeps those ``run`` *reserved* for the holder: its next allocations continue right after its last
slot. A reserved slot is still free: it counts in :attr:`KVManager.num_free`, and when the free
list runs dry an allocation takes the far half of the largest reservation, so capacity is exactly
that of single-slot allocation (a request that fits the pool alone is never refused). A holder's
reservation goes back to the free list with its last slot, in runs (the free list is a stack:
what a holder gives back comes out again as the runs it was). Slots given back scattered break the
list's order: a carve that finds a short run sorts it first (lowest slot first; see
:data:`LOOSE_SORT`), so a new run starts from the lowest free slots. Slot numbers never change an output
(attention reads a sequence's slots in its own order); ``run=0`` is the reference: one slot at a
time from one free list, as before.

Invariants (checked by :meth:`KVManager.check_invariants`): every slot is exactly one of free
(count 0, on the free list once), reserved (count 0, in one holder's reservation) or in use
(count >= 1); each slot's count equals the number of holders holding it; a holder holds a slot at
most once; a reservation is one run of consecutive slots and belongs to a holder that holds
slots; free + reserved + in use == pool size.
:meth:`KVManager.check_holder` and :meth:`KVManager.check_counts` check a holder's own record
(a branch's K/V list) against the pool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence


class OutOfSlots(RuntimeError):
    """Raised by :meth:`KVManager.allocate` when the pool has fewer free slots than asked for."""


RUN = 64
"""Slots a holder keeps reserved after its last one (:class:`KVManager`'s ``run``): 64 keys are
one block of the decode-attention kernel on the shipped tiny model (24 KiB a layer)."""
LOOSE_SORT = 8
"""A carve that finds a short run sorts the free list once the slots given back since the last
sort are at least ``1 / LOOSE_SORT`` of it (amortised: a sort costs O(free list); a large pool's
list is sorted rarely, while most slots given back come in runs, handed out again as they are)."""


class KVManager:
    """Slot bookkeeping for a pool of ``num_slots`` token slots; ``run``: slots reserved after a
    holder's last one (0: none, one slot at a time)."""

    def __init__(self, num_slots: int, run: int = RUN) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        if run < 0:
            raise ValueError(f"run must be >= 0, got {run}")
        self.num_slots = num_slots
        self.run = run
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self._ref: list[int] = [0] * num_slots
        self._held: dict[Hashable, list[int]] = {}
        # holder -> its reserved run, descending: pop() gives the slot after its last one
        self._resv: dict[Hashable, list[int]] = {}
        self._num_resv = 0
        self._loose = 0  # slots given back to the free list since it was last sorted

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Slots an allocation can take: the free list and every reservation."""
        return len(self._free) + self._num_resv

    @property
    def num_used(self) -> int:
        return self.num_slots - self.num_free

    @property
    def num_reserved(self) -> int:
        return self._num_resv

    def refcount(self, slot: int) -> int:
        return self._ref[slot]

    def held(self, holder: Hashable) -> list[int]:
        """The slots ``holder`` holds (empty if none); do not mutate."""
        return self._held.get(holder, [])

    def reserved(self, holder: Hashable) -> list[int]:
        """The slots reserved for ``holder``'s next allocations, in the order they will come."""
        return self._resv.get(holder, [])[::-1]

    def holders(self) -> list[Hashable]:
        return list(self._held)

    # -- operations ------------------------------------------------------------------------
    def allocate(self, holder: Hashable, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self.num_free:
            raise OutOfSlots(f"asked for {n} KV slots, {self.num_free} free of {self.num_slots}")
        if n == 0:
            return []
        own = self._resv.pop(holder, None)
        if own:  # continue the holder's run
            k = min(n, len(own))
            slots = own[len(own) - k :][::-1]
            del own[len(own) - k :]
            self._num_resv -= k
            if own:
                self._resv[holder] = own
        else:
            slots = []
        while len(slots) < n:  # a new run: carved from the free list, else from a reservation
            m = n - len(slots)
            got = self._carve(m + self.run) if self._free else self._steal(m)
            slots += got[:m]
            rest = got[m:]  # only once the holder has all its slots: it becomes the reservation
            if rest:
                self._resv[holder] = rest[::-1]
                self._num_resv += len(rest)
        ref = self._ref
        for s in slots:
            ref[s] = 1
        self._held.setdefault(holder, []).extend(slots)
        return slots

    def _carve(self, want: int) -> list[int]:
        """Up to ``want`` consecutive slots from the top of the free list (at least one). Slots
        given back since the last sort may have broken the list's runs: if the run found is
        short, the list is sorted (the lowest slot on top) and the run taken again."""
        free = self._free
        got = [free.pop()]
        while len(got) < want and free and free[-1] == got[-1] + 1:
            got.append(free.pop())
        if len(got) < want and free and self.run and self._loose * LOOSE_SORT >= len(free):
            free.extend(reversed(got))
            free.sort(reverse=True)  # a few sorted stretches: near linear
            self._loose = 0
            return self._carve(want)
        return got

    def _steal(self, m: int) -> list[int]:
        """The free list is empty: the far end of the largest reservation, at least half of it
        (its holder keeps the slots next to its own), ascending."""
        victim = max(self._resv, key=lambda h: len(self._resv[h]))
        r = self._resv[victim]
        k = min(len(r), max(m, len(r) // 2))
        got = r[k - 1 :: -1]
        del r[:k]
        if not r:
            del self._resv[victim]
        self._num_resv -= k
        return got

    def share(self, holder: Hashable, slots: Iterable[int]) -> None:
        slots = list(slots)
        ref = self._ref
        for s in slots:
            if ref[s] <= 0:
                raise ValueError(f"cannot share slot {s}: it is free (holder {holder!r})")
        for s in slots:
            ref[s] += 1
        if slots:
            self._held.setdefault(holder, []).extend(slots)

    def release(self, holder: Hashable) -> int:
        """Drop all of ``holder``'s references and its reservation; returns how many slots became
        free (the reservation's were free already). The free list takes them back so that it
        hands them out again in ascending runs."""
        if holder not in self._held:
            raise KeyError(f"release of {holder!r}, which holds no KV slots (double free?)")
        slots = self._held.pop(holder)
        self._unreserve(holder)
        ref, free = self._ref, self._free
        freed = 0
        for s in reversed(slots):
            ref[s] -= 1
            if ref[s] == 0:
                free.append(s)
                freed += 1
            elif ref[s] < 0:  # pragma: no cover - guarded by the bookkeeping above
                raise RuntimeError(f"slot {s} reference count went negative")
        self._loose += freed
        return freed

    def _unreserve(self, holder: Hashable) -> None:
        own = self._resv.pop(holder, None)
        if own:
            self._free.extend(own)  # descending: the free list hands them out ascending
            self._loose += len(own)
            self._num_resv -= len(own)

    def release_if_held(self, holder: Hashable) -> int:
        return self.release(holder) if holder in self._held else 0

    def transfer(self, src: Hashable, dst: Hashable, slots: Iterable[int]) -> None:
        """Move ``src``'s references on ``slots`` to ``dst`` (counts unchanged); a ``src`` left
        with no slots gives its reservation back."""
        moving = list(slots)
        have = self._held.get(src, [])
        gone = set(moving)
        if len(gone) != len(moving) or not gone.issubset(have):
            raise ValueError(f"transfer: {src!r} does not hold all of the slots to move")
        rest = [s for s in have if s not in gone]
        if rest:
            self._held[src] = rest
        else:
            self._held.pop(src, None)
            self._unreserve(src)
        if moving:
            self._held.setdefault(dst, []).extend(moving)

    # -- invariants ------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise ``AssertionError`` naming the first broken invariant (see module docstring).
        Linear in the pool size plus the held lists, mostly at C speed (tests call it every step)."""
        free, ref = self._free, self._ref
        if len(set(free)) != len(free):
            raise AssertionError("a slot is on the free list twice")
        counts: Counter[int] = Counter()
        for holder, slots in self._held.items():
            if not slots:
                raise AssertionError(f"holder {holder!r} is registered with no slots")
            if len(set(slots)) != len(slots):
                raise AssertionError(f"holder {holder!r} holds a slot twice")
            counts.update(slots)
        expect = [0] * self.num_slots
        for s, c in counts.items():
            expect[s] = c
        if expect != ref:
            s = next(i for i, (a, b) in enumerate(zip(ref, expect)) if a != b)
            raise AssertionError(f"slot {s}: count {ref[s]} but {expect[s]} holders")
        if any([ref[s] for s in free]):
            s = next(s for s in free if ref[s])
            raise AssertionError(f"free slot {s} has count {ref[s]}, {counts[s]} holders")
        reserved: list[int] = []
        for holder, run in self._resv.items():
            if holder not in self._held:
                raise AssertionError(f"{holder!r} has a reservation and holds no slots")
            if not run or run != list(range(run[0], run[0] - len(run), -1)):
                raise AssertionError(f"{holder!r}'s reservation is not one run: {run[::-1][:8]}")
            reserved += run
        if any([ref[s] for s in reserved]):
            raise AssertionError(f"reserved slot {next(s for s in reserved if ref[s])} is in use")
        if len(set(reserved)) != len(reserved) or set(reserved) & set(free):
            raise AssertionError("a slot is reserved twice, or reserved and on the free list")
        if len(reserved) != self._num_resv:
            raise AssertionError(f"{len(reserved)} slots reserved, counted {self._num_resv}")
        used = self.num_slots - ref.count(0)
        if used + len(free) + len(reserved) != self.num_slots:
            raise AssertionError(
                f"free {len(free)} + reserved {len(reserved)} + used {used} != pool {self.num_slots}"
            )

    def check_holder(self, holder: Hashable, slots: Sequence[int]) -> None:
        """Raise ``AssertionError`` unless ``holder`` holds exactly ``slots`` (in any order)."""
        held = self._held.get(holder, [])
        if len(held) != len(slots) or set(held) != set(slots):
            extra, missing = set(held) - set(slots), set(slots) - set(held)
            raise AssertionError(f"{holder!r} holds {len(held)} slots, lists {len(slots)}: "
                                 f"held, not listed {sorted(extra)[:8]}; listed, not held {sorted(missing)[:8]}")  # fmt: skip

    def check_counts(self, counts: Mapping[int, int]) -> None:
        """Raise ``AssertionError`` unless each slot ``s`` has at least ``counts[s]`` references."""
        ref = self._ref
        low = [s for s, c in counts.items() if ref[s] < c]
        if low:
            raise AssertionError(f"slot {low[0]} has {ref[low[0]]} references, {counts[low[0]]} holders list it")
