"""The scheduler without a model: chunked prefill, the token budget, prefix-cache hits, preemption
of whole families (recomputed later with the layout mask, same output), a request larger than the
pool. Tokens are scripted (``forced_output``); every step ends with the KVManager's and every
request's ``check_invariants`` (:class:`ModelFree`)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import ModelFree, block  # noqa: E402

from multiverse.engine.request import Status  # noqa: E402

FAMILY = "<Think>\n" + block([("1", "a b c d e f"), ("2", "x y"), ("3", "p q r")]) + "</Think>"
WORDS = " ".join(f"w{i}" for i in range(60))


def test_chunked_prefill(tok):
    mf = ModelFree(tok, prefill_chunk=16)
    req = mf.add(WORDS, "ok", max_tokens=10)
    n = req.prompt_len
    assert n > 40
    chunks = []
    while req.root.num_computed < n:
        (w,) = mf.step()
        chunks.append((w.start, w.count, w.completes))
        assert w.branch.kv[-w.count :] == w.slots and not w.masked
    sizes = [c for _, c, _ in chunks]
    assert sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16 and sum(sizes) == n
    assert [s for s, _, _ in chunks] == [16 * i for i in range(len(chunks))]
    assert [done for *_, done in chunks] == [False] * (len(chunks) - 1) + [True]
    assert req.root.attend == req.root.kv and len(req.root.kv) == n
    mf.run()
    assert mf.text(req) == "ok" and mf.kv.num_used == 0


def test_budget_is_shared_in_arrival_order(tok):
    mf = ModelFree(tok, max_batch_tokens=24, prefill_chunk=16)
    reqs = [mf.add(f"{WORDS} {i}", "ok", max_tokens=5) for i in range(3)]
    while not all(r.finished for r in reqs):
        works = mf.step()
        assert sum(w.count for w in works) <= 24
        ids = [w.branch.request.id for w in works]
        assert ids == sorted(ids)  # priority: arrival
    first = mf.history[0]
    assert [(w.branch.request.id, w.count) for w in first] == [(0, 16), (1, 8)]
    assert all(mf.text(r) == "ok" for r in reqs)


def test_serial_branches_run_one_branch_per_request(tok):
    mf = ModelFree(tok)
    req = mf.add("q", FAMILY, max_tokens=300, serial_branches=True)
    mf.run()
    assert req.num_blocks == 1 and mf.text(req) == FAMILY
    assert all(len(works) == 1 for works in mf.history)


def test_prefix_cache_hit_shares_the_cached_slots(tok):
    mf = ModelFree(tok, prefix_cache=True)
    a = mf.add(WORDS + " first", "ok", max_tokens=5)
    mf.run()
    cached = mf.radix.num_cached_tokens()
    assert cached == len(a.root.own_ids) > a.prompt_len  # its prompt and its output
    b = mf.add(WORDS + " second", "ok", max_tokens=5)
    hit = mf.radix.match(b.prompt_ids[:-1], namespace=b.parallel)
    assert len(hit) >= len(mf.encode(WORDS)) - 1  # the tokens both prompts start with
    (w,) = mf.step()
    assert w.start == len(hit) and w.count == b.prompt_len - len(hit)  # only the rest is computed
    assert b.root.kv[: len(hit)] == hit and all(mf.kv.refcount(s) == 2 for s in hit)
    mf.run()
    assert mf.text(b) == "ok"
    mf.radix.clear()
    assert mf.kv.num_used == 0


def _forked(mf: ModelFree, prompt: str = "q"):
    req = mf.add(prompt, FAMILY, max_tokens=300)
    while not (req.root.children and all(c.num_computed > 2 for c in req.root.children)):
        mf.step()
    return req


def test_preempt_takes_the_last_branch_first_and_resumes_identically(tok):
    mf = ModelFree(tok)
    req = _forked(mf)
    root, kids = req.root, list(req.root.children)
    order = req.branches()
    assert order == [root, *kids]
    # one slot more than is free: only the lowest-priority branch (path 3) goes
    assert mf.scheduler._make_room(mf.kv.num_free + 1, order)
    assert not kids[2].attached and kids[2].kv == [] and kids[2].num_computed == 0
    assert kids[2].masked_until == len(kids[2].own_ids)  # recomputed with the layout mask
    assert kids[0].resident and kids[1].resident and mf.scheduler.num_preemptions == 1
    mf.check()
    # the whole pool: the family goes, children before their parent
    assert mf.scheduler._make_room(mf.kv.num_slots, order)
    assert mf.kv.num_used == 0 and mf.scheduler.num_preemptions == 4
    assert root.attached and root.kv == [] and all(not c.attached for c in kids)
    assert root.status is Status.WAITING and root.masked_until == len(root.own_ids)
    mf.check()
    mf.step()  # only the root runs: its children wait for their prefix
    (w,) = mf.history[-1]
    assert w.branch is root and w.masked and w.start == 0
    mf.run()
    assert mf.text(req) == FAMILY and req.finish_reason == "stop" and mf.kv.num_used == 0
    recomputed = [w for works in mf.history for w in works if w.branch in kids and w.start == 0]
    assert len(recomputed) == 6 and all(w.masked for w in recomputed[3:])  # first run, then after preemption


def test_pool_pressure_preempts_whole_families_of_later_requests(tok):
    """A long prompt arriving first needs the pool: the later, forked request loses its branches,
    last in pre-order first (a parent only after all its descendants), and when it runs again it
    writes exactly what it writes alone."""
    alone = ModelFree(tok)
    ref = _forked(alone)
    alone.run()
    mf = ModelFree(tok, num_slots=215, prefill_chunk=4, max_batch_tokens=8)
    big = mf.add(" ".join(f"v{i}" for i in range(70)), "ok", max_tokens=5)  # 200 prompt tokens
    fam = mf.add("q", FAMILY, max_tokens=300)
    victims = []
    preempt = mf.scheduler.preempt

    def spy(branch):
        assert all(not c.attached for c in branch.children), f"{branch} preempted before its children"
        victims.append(branch)
        preempt(branch)

    mf.scheduler.preempt = spy
    while not big.finished:
        mf.step()
        order = fam.branches()
        gone = [not (b.attached and b.kv) for b in order]
        if True in gone:  # the preempted branches are a suffix of the pre-order
            assert all(gone[gone.index(True) :]), [b for b, g in zip(order, gone, strict=True) if g]
    assert fam.root in victims and len(set(victims)) == 4 and big not in {v.request for v in victims}
    mf.run()
    assert mf.text(fam) == alone.text(ref) == FAMILY
    assert fam.root.own_ids == ref.root.own_ids and fam.root.own_pos == ref.root.own_pos
    assert fam.root.own_forced == ref.root.own_forced
    assert mf.kv.num_used == 0


def test_request_larger_than_the_pool_is_finished_not_hung(tok):
    mf = ModelFree(tok, num_slots=16, prefill_chunk=8)
    req = mf.add(WORDS, "ok", max_tokens=10, parallel=False)
    mf.run(max_steps=10)
    assert req.finish_reason == "kv_capacity" and mf.kv.num_used == 0


def test_model_free_runs_the_real_engine_step(tok):
    """:class:`ModelFree` is :meth:`LLM.step` over a weightless model (no copy of the step to keep
    in sync): every step with work is one forward of the model, finished requests leave the
    engine, and an exception inside the step reaches the test instead of failing the request."""
    mf = ModelFree(tok)
    req = mf.add("q", FAMILY, max_tokens=300)
    mf.run()
    assert mf.text(req) == FAMILY and mf.llm.requests == []
    assert mf.model.forwards == sum(1 for works in mf.history if works) > 0
    broken = ModelFree(tok)
    broken.add("q", "ok", max_tokens=5)
    broken.model.error = RuntimeError("forward failed")
    with pytest.raises(RuntimeError, match="forward failed"):
        broken.step()


def test_a_full_pool_evicts_a_share_of_it_at_once(tok):
    # finished outputs fill the pool with cache in a long-running server; evicting only each
    # step's shortfall (one slot) would walk the whole cache every step
    from multiverse.engine.kv_manager import KVManager
    from multiverse.engine.radix import RadixCache
    from multiverse.engine.scheduler import EVICT_SHARE, Scheduler

    kv = KVManager(640)
    radix = RadixCache(kv)
    for i in range(64):  # 64 cached outputs of 10 tokens fill the pool
        toks = [i, *range(1000, 1009)]
        radix.insert(toks, kv.allocate(i, 10))
        kv.release(i)
    assert kv.num_free == 0
    assert Scheduler(kv, radix)._make_room(1, [])
    assert kv.num_free >= 640 // EVICT_SHARE == 10  # old code: 1
    assert radix.num_cached_tokens() == 640 - kv.num_free
    radix.check()
    kv.check_invariants()
