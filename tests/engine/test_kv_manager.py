"""KV slot allocator: reference counts, sharing (fork), transfer, no double free."""

import random

import pytest
from _engine_util import slot_breaks

from multiverse.engine.kv_manager import KVManager, OutOfSlots


def test_allocate_share_release_counts():
    kv = KVManager(8)
    a = kv.allocate("parent", 3)
    assert a == [0, 1, 2] and kv.num_free == 5
    kv.share("child1", a)
    kv.share("child2", a)
    b = kv.allocate("child1", 2)
    assert [kv.refcount(s) for s in a] == [3, 3, 3] and [kv.refcount(s) for s in b] == [1, 1]
    kv.check_invariants()
    assert kv.release("parent") == 0  # children still hold the prefix
    assert kv.release("child1") == 2  # only its own two slots become free
    assert kv.num_free == 5
    assert kv.release("child2") == 3
    assert kv.num_free == 8
    kv.check_invariants()


def test_double_free_and_sharing_free_slots_raise():
    kv = KVManager(4)
    kv.allocate("x", 2)
    kv.release("x")
    with pytest.raises(KeyError, match="double free"):
        kv.release("x")
    with pytest.raises(ValueError, match="free"):
        kv.share("y", [0])
    with pytest.raises(OutOfSlots, match="asked for 5"):
        kv.allocate("z", 5)
    kv.check_invariants()
    assert kv.num_free == 4


def test_transfer_moves_references_without_changing_counts():
    kv = KVManager(6)
    s = kv.allocate("node", 4)
    kv.transfer("node", "mid", s[:2])
    assert kv.held("node") == s[2:] and kv.held("mid") == s[:2]
    assert all(kv.refcount(x) == 1 for x in s)
    with pytest.raises(ValueError):
        kv.transfer("node", "other", s[:1])
    kv.check_invariants()


def test_invariant_checker_detects_corruption():
    kv = KVManager(4)
    kv.allocate("x", 2)
    kv._ref[0] += 1  # simulate a bookkeeping bug
    with pytest.raises(AssertionError, match="slot 0"):
        kv.check_invariants()


def test_random_fork_join_workload_keeps_invariants():
    rng = random.Random(0)
    kv = KVManager(64)
    holders: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(500):
        op = rng.random()
        if op < 0.4 and kv.num_free:
            n = rng.randint(1, min(4, kv.num_free))
            holders.setdefault(next_id, []).extend(kv.allocate(next_id, n))
            next_id += 1
        elif op < 0.7 and holders:  # fork: a new holder shares an existing one's slots
            src = rng.choice(list(holders))
            kv.share(next_id, holders[src])
            holders[next_id] = list(holders[src])
            next_id += 1
        elif holders:
            h = rng.choice(list(holders))
            kv.release(h)
            del holders[h]
        kv.check_invariants()
    for h in list(holders):
        kv.release(h)
    kv.check_invariants()
    assert kv.num_free == 64


# -- runs: a holder's slots continue its last ones (locality), capacity unchanged -----------
@pytest.mark.parametrize("run", [0, 16, 64])
def test_sequences_decoding_in_lockstep_get_consecutive_slots(run):
    # 16 sequences: a 3-token prompt each, then one slot each a step, interleaved. Without runs
    # (run=0) every sequence's consecutive tokens lie 16 slots apart.
    kv = KVManager(16 * (203 + run + 1), run=run)
    seqs = {i: kv.allocate(i, 3) for i in range(16)}
    for _ in range(200):
        for i in range(16):
            seqs[i] += kv.allocate(i, 1)
    kv.check_invariants()
    for i, slots in seqs.items():
        assert kv.held(i) == slots
        if run:
            # runs of at least run + 1 slots
            assert slot_breaks(slots) <= (len(slots) - 1) // run, (i, slots[:80])
        else:
            assert slot_breaks(slots) == len(slots) - 3  # a jump after every token of the decode
    assert kv.num_free == 16 * (run + 1)  # reserved slots are free


def test_a_reservation_continues_the_holder_and_counts_as_free():
    kv = KVManager(100, run=8)
    assert kv.allocate("a", 3) == [0, 1, 2] and kv.reserved("a") == list(range(3, 11))
    assert kv.allocate("b", 2) == [11, 12] and kv.reserved("b") == list(range(13, 21))
    assert kv.num_free == 100 - 5 and kv.num_used == 5 and kv.num_reserved == 16
    assert kv.allocate("a", 9) == list(range(3, 11)) + [21]  # its run, then a new one
    assert kv.reserved("a") == list(range(22, 30))
    kv.check_invariants()
    assert kv.release("a") == 12  # its slots; its reservation was free already
    assert kv.reserved("a") == [] and kv.num_free == 98 and kv.num_reserved == 8
    assert kv.allocate("c", 4) == [0, 1, 2, 3]  # the free list hands released slots out ascending
    kv.check_invariants()


def test_a_full_free_list_takes_the_far_half_of_the_largest_reservation():
    kv = KVManager(100, run=64)
    kv.allocate("a", 1)  # holds 0, reserves 1..64
    kv.allocate("b", 1)  # holds 65, reserves the rest, 66..99 (34)
    assert kv.num_free == 98 and kv.num_reserved == 98
    assert kv.allocate("c", 1) == [33]  # a's far half: 33..64; a keeps 1..32
    assert kv.reserved("a") == list(range(1, 33)) and kv.reserved("c") == list(range(34, 65))
    # the largest first: all of b's 34, then the far half of a's 32
    assert kv.allocate("d", 50) == list(range(66, 100)) + list(range(17, 33))
    assert kv.reserved("b") == [] and kv.reserved("a") == list(range(1, 17))
    assert kv.reserved("c") == list(range(34, 65))
    kv.check_invariants()
    rest = kv.num_free
    assert rest == 100 - 53
    assert len(kv.allocate("e", rest)) == rest and kv.num_free == 0  # every reserved slot is taken
    kv.check_invariants()
    with pytest.raises(OutOfSlots):
        kv.allocate("a", 1)
    assert kv.held("a") == [0]


def test_a_new_run_after_interleaved_releases_starts_at_the_lowest_free_slots():
    kv = KVManager(64, run=0)
    for _ in range(16):  # two holders one slot at a time: a holds the even slots, b the odd
        kv.allocate("a", 1)
        kv.allocate("b", 1)
    kv.release("a")
    kv.release("b")  # the free list's top: b's odd slots, then a's even ones
    kv.run = 8
    assert kv.allocate("c", 4) == [0, 1, 2, 3] and kv.reserved("c") == list(range(4, 12))
    kv.check_invariants()


def test_transferring_all_of_a_holders_slots_gives_its_reservation_back():
    kv = KVManager(20, run=4)
    s = kv.allocate("node", 3)
    kv.transfer("node", "mid", s)
    assert kv.reserved("node") == [] and kv.num_reserved == 0 and kv.num_free == 17
    kv.check_invariants()


def test_invariant_checker_detects_a_broken_reservation():
    kv = KVManager(20, run=4)
    kv.allocate("x", 2)  # reserves 2..5
    kv._resv["x"][1] = 9  # not one run any more
    with pytest.raises(AssertionError, match="not one run"):
        kv.check_invariants()
    kv = KVManager(20, run=4)
    kv.allocate("x", 2)
    kv._free.append(3)  # reserved and free at once
    with pytest.raises(AssertionError, match="reserved and on the free list"):
        kv.check_invariants()
    kv = KVManager(20, run=4)
    kv.allocate("x", 2)
    kv._resv["y"] = [7]  # a reservation of a holder that holds nothing
    with pytest.raises(AssertionError, match="holds no slots"):
        kv.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_runs_change_no_capacity_under_a_random_workload(seed):
    # the same operations on a manager with runs and one without: the same slots are free after
    # every operation and an allocation fails on both or on neither
    rng = random.Random(seed)
    pools = {run: KVManager(48, run=run) for run in (0, 8)}
    holders: dict[int, dict[int, list[int]]] = {run: {} for run in pools}
    live: list[int] = []
    next_id = steals = reserving = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.5:
            n = rng.randint(1, 12)
            h = rng.choice(live) if live and rng.random() < 0.7 else next_id
            ok = {run: n <= kv.num_free for run, kv in pools.items()}
            assert ok[0] == ok[8]
            if ok[0]:
                steals += pools[8].num_free - pools[8].num_reserved < n  # takes reserved slots
                for run, kv in pools.items():
                    holders[run].setdefault(h, []).extend(kv.allocate(h, n))
                if h == next_id:
                    live.append(h)
                    next_id += 1
            else:
                for kv in pools.values():
                    with pytest.raises(OutOfSlots):
                        kv.allocate(h, n)
        elif op < 0.7 and live:  # fork: a new holder shares an existing one's slots
            src = rng.choice(live)
            for run, kv in pools.items():
                kv.share(next_id, holders[run][src])
                holders[run][next_id] = list(holders[run][src])
            live.append(next_id)
            next_id += 1
        elif op < 0.8 and live:  # part of a holder's slots move to a new holder (a cache split)
            src = rng.choice(live)
            k = rng.randint(1, len(holders[0][src]))
            for run, kv in pools.items():
                moving = holders[run][src][:k]
                kv.transfer(src, next_id, moving)
                holders[run][next_id] = moving
                holders[run][src] = holders[run][src][k:]
            live.append(next_id)
            if not holders[0][src]:
                live.remove(src)
            next_id += 1
        elif live:
            h = rng.choice(live)
            freed = {run: kv.release(h) for run, kv in pools.items()}
            assert freed[0] == freed[8]
            live.remove(h)
        for run, kv in pools.items():
            kv.check_invariants()
            for h in live:
                assert sorted(kv.held(h)) == sorted(holders[run][h])
        assert pools[0].num_free == pools[8].num_free
        reserving += pools[8].num_reserved > 0
    assert steals > 5 and reserving > 50  # the workload exercised the reservations
