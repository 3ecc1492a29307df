"""KV slot allocator: reference counts, sharing (fork), transfer, no double free."""

import random

import pytest

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
