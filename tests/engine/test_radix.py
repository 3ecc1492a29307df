"""Radix prefix cache: longest-prefix match, edge splits, LRU eviction that never frees in-use KV."""

from multiverse.engine.kv_manager import KVManager
from multiverse.engine.radix import RadixCache


def _cache(n=32):
    kv = KVManager(n)
    return kv, RadixCache(kv)


def _prompt(kv, holder, tokens):
    """A request that computed ``tokens`` into fresh slots and then finished caching them."""
    slots = kv.allocate(holder, len(tokens))
    return slots


def test_match_insert_and_split():
    kv, rc = _cache()
    a = _prompt(kv, "r1", [1, 2, 3, 4])
    assert rc.insert([1, 2, 3, 4], a) == 4
    kv.release("r1")  # request done: the cache alone keeps the K/V
    assert kv.num_used == 4
    assert rc.match([1, 2, 3, 4, 5]) == a
    assert rc.match([1, 2, 9]) == a[:2]  # ends inside an edge
    assert rc.match([7]) == []
    b = _prompt(kv, "r2", [1, 2, 7, 8])
    assert rc.insert([1, 2, 7, 8], b) == 2  # shares [1, 2], adds [7, 8] after a split
    assert rc.match([1, 2, 7, 8]) == a[:2] + b[2:]
    kv.release("r2")
    assert kv.num_used == 6  # b[:2] were duplicates and are free again
    assert rc.num_cached_tokens() == 6
    kv.check_invariants()


def test_namespaces_are_separate():
    kv, rc = _cache()
    a = _prompt(kv, "r", [1, 2])
    rc.insert([1, 2], a, namespace="multiverse")
    assert rc.match([1, 2], namespace="plain") == []
    assert rc.match([1, 2], namespace="multiverse") == a


def test_lru_eviction_skips_in_use_prefixes():
    kv, rc = _cache(16)
    old = _prompt(kv, "old", [1, 1, 1])
    rc.insert([1, 1, 1], old)
    kv.release("old")
    new = _prompt(kv, "new", [2, 2, 2])
    rc.insert([2, 2, 2], new)
    kv.release("new")
    hit = rc.match([2, 2, 2])  # most recent use
    kv.share("reader", hit)  # a running request reads it
    assert rc.evictable_slots() == 3
    assert rc.evict(100) == 3  # only the unread, least recently used prefix goes
    assert rc.match([1, 1, 1]) == [] and rc.match([2, 2, 2]) == new
    kv.release("reader")
    assert rc.evict(1) == 3
    assert kv.num_free == 16
    kv.check_invariants()


def test_eviction_is_lru_and_climbs_to_parents():
    kv, rc = _cache(16)
    for i, toks in enumerate(([5, 6, 1], [5, 6, 2], [9])):
        rc.insert(toks, _prompt(kv, i, toks))
        kv.release(i)
    rc.match([9])  # touch [9]: the 5-6 family is older
    assert rc.evict(2) == 2  # leaves [1] and [2] go first (LRU), one slot each
    assert rc.match([9]) != []
    assert rc.evict(2) == 2  # now [5, 6] is a leaf and goes before [9]
    assert rc.match([9]) != [] and rc.match([5, 6]) == []
    rc.clear()
    assert kv.num_free == 16
    kv.check_invariants()


def test_one_eviction_climbs_to_parents_that_become_leaves():
    kv, rc = _cache(16)
    for i, toks in enumerate(([5, 6, 1], [5, 6, 2])):
        rc.insert(toks, _prompt(kv, i, toks))
        kv.release(i)
    assert kv.num_used == 4 and rc.evictable_slots() == 4
    assert rc.evict(4) == 4  # [1], [2], then their parent [5, 6], in one call
    assert kv.num_free == 16 and rc.num_cached_tokens() == 0
    kv.check_invariants()


def test_eviction_frees_the_tail_of_a_prefix_a_request_reads():
    # a root takes all but its prompt's last token from the cache and computes that one anew:
    # the cached last slot is the cache's alone and must not be stranded (issue 28, item 1)
    kv, rc = _cache(8)
    prompt = [1, 2, 3, 4]
    slots = _prompt(kv, "first", prompt)
    rc.insert(prompt, slots)
    kv.release("first")
    hit = rc.match(prompt[:-1])
    kv.share("again", hit)
    assert hit == slots[:3] and rc.evictable_slots() == 1
    assert rc.evict(1) == 1 and kv.num_free == 8 - 3
    assert rc.match(prompt) == slots[:3]  # the part in use stays cached
    kv.release("again")
    assert rc.evict(8) == 3 and kv.num_free == 8
    kv.check_invariants()


def test_eviction_frees_a_prefix_the_cache_alone_holds_above_one_a_request_reads():
    # a request computed [1, 2, 3, 4] itself while [1, 2] was cached by another: its [3, 4] hangs
    # below the cache's own copy of [1, 2], which no request reads and must still be evictable
    kv, rc = _cache(8)
    rc.insert([1, 2], _prompt(kv, "other", [1, 2]))
    kv.release("other")
    mine = _prompt(kv, "mine", [1, 2, 3, 4])
    assert rc.insert([1, 2, 3, 4], mine) == 2
    assert kv.num_used == 6 and rc.evictable_slots() == 2
    assert rc.evict(2) == 2 and kv.num_used == 4  # the request keeps all its slots
    assert rc.match([1, 2, 3, 4]) == [] and rc.num_cached_tokens() == 0
    kv.check_invariants()
    kv.release("mine")
    assert kv.num_free == 8


def test_the_cached_token_count_follows_inserts_splits_evictions_and_clears():
    # kept as a running count (the server reads it every step), which check() recounts
    kv, rc = _cache(32)
    for i, toks in enumerate(([1, 2, 3, 4], [1, 2, 7], [9, 9], [1, 2, 3, 4, 5, 6])):
        rc.insert(toks, _prompt(kv, i, toks))
        kv.release(i)
        rc.check()
    assert rc.num_cached_tokens() == 4 + 1 + 2 + 2
    hit = rc.match([1, 2, 3])
    kv.share("reader", hit)
    rc.evict(3)
    rc.check()
    assert rc.num_cached_tokens() == kv.num_used and rc.match([1, 2, 3]) == hit
    rc.evict(32)  # the tail of [1, 2, 3, 4] goes, the part the reader holds stays
    rc.check()
    assert rc.num_cached_tokens() == 3
    rc.clear()
    rc.check()
    assert rc.num_cached_tokens() == 0
    kv.release("reader")
    kv.check_invariants()


def test_a_slot_two_entries_hold_counts_once_and_is_freed_with_the_second():
    # a structured prompt adopts a path's K/V from the path's entry: its own entry lists them too
    kv, rc = _cache(16)
    a = _prompt(kv, "path", [1, 2, 3])
    rc.insert([1, 2, 3], a)
    kv.release("path")
    mine = kv.allocate("reduce", 2)
    kv.share("reduce", a[2:])
    merged = [mine[0], a[2], mine[1]]  # computed, adopted, computed
    rc.insert([5, 3, 6], merged)
    kv.release("reduce")
    rc.check()
    assert kv.num_used == 5
    assert rc.evictable_slots() == 5  # a[2] once; old code: 4 (its count is 2: never "cache only")
    rc.match([5, 3, 6])  # the merged entry is the most recent: the path's goes first
    assert rc.evict(1) == 2  # a[:2]; a[2] stays, the merged entry holds it
    assert rc.match([5, 3, 6]) == merged and rc.match([1, 2, 3]) == []
    rc.check()
    assert rc.evict(1) == 3
    assert kv.num_free == 16
    rc.check()
    kv.check_invariants()


def test_eviction_keeps_a_run_a_request_reads_inside_an_edge():
    kv, rc = _cache(16)
    slots = _prompt(kv, "r", [5, 3, 6, 7])
    rc.insert([5, 3, 6, 7], slots)
    kv.release("r")
    kv.share("reader", slots[1:2])  # a path's run, adopted by another prompt
    assert rc.evictable_slots() == 3
    assert rc.evict(2) == 2  # the tail after the run goes; the head (and the run) stay
    assert rc.match([5, 3, 6, 7]) == slots[:2]
    assert rc.evict(100) == 1  # the head goes too: the reader keeps its slot, the cache forgets it
    assert rc.match([5, 3]) == [] and kv.refcount(slots[1]) == 1
    kv.release("reader")
    assert kv.num_free == 16
    rc.check()
    kv.check_invariants()
