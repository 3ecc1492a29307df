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

Invariants (checked by :meth:`KVManager.check_invariants`): every slot is either free (count 0,
on the free list exactly once) or in use (count >= 1); each slot's count equals the number of
holders holding it; a holder holds a slot at most once; free + in use == pool size.
:meth:`KVManager.check_holder` and :meth:`KVManager.check_counts` check a holder's own record
(a branch's K/V list) against the pool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence


class OutOfSlots(RuntimeError):
    """Raised by :meth:`KVManager.allocate` when the pool has fewer free slots than asked for."""


class KVManager:
    """Slot bookkeeping for a pool of ``num_slots`` token slots."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self._ref: list[int] = [0] * num_slots
        self._held: dict[Hashable, list[int]] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def refcount(self, slot: int) -> int:
        return self._ref[slot]

    def held(self, holder: Hashable) -> list[int]:
        """The slots ``holder`` holds (empty if none); do not mutate."""
        return self._held.get(holder, [])

    def holders(self) -> list[Hashable]:
        return list(self._held)

    # -- operations ------------------------------------------------------------------------
    def allocate(self, holder: Hashable, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > len(self._free):
            raise OutOfSlots(f"asked for {n} KV slots, {len(self._free)} free of {self.num_slots}")
        free, ref = self._free, self._ref
        slots = [free.pop() for _ in range(n)]
        for s in slots:
            ref[s] = 1
        if slots:
            self._held.setdefault(holder, []).extend(slots)
        return slots

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
        """Drop all of ``holder``'s references; returns how many slots became free."""
        if holder not in self._held:
            raise KeyError(f"release of {holder!r}, which holds no KV slots (double free?)")
        slots = self._held.pop(holder)
        ref, free = self._ref, self._free
        freed = 0
        for s in slots:
            ref[s] -= 1
            if ref[s] == 0:
                free.append(s)
                freed += 1
            elif ref[s] < 0:  # pragma: no cover - guarded by the bookkeeping above
                raise RuntimeError(f"slot {s} reference count went negative")
        return freed

    def release_if_held(self, holder: Hashable) -> int:
        return self.release(holder) if holder in self._held else 0

    def transfer(self, src: Hashable, dst: Hashable, slots: Iterable[int]) -> None:
        """Move ``src``'s references on ``slots`` to ``dst`` (counts unchanged)."""
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
        used = self.num_slots - ref.count(0)
        if used + len(free) != self.num_slots:
            raise AssertionError(f"free {len(free)} + used {used} != pool {self.num_slots}")

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
