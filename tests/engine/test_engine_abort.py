"""``LLM.abort``: a request ends between two steps with every branch, its KV goes back to the
pool, its output so far stays readable, and the other requests are untouched."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, engine  # noqa: E402

from multiverse import SamplingParams  # noqa: E402
from multiverse.engine.request import Status  # noqa: E402

FORK = "<Think>\n" + block([("1", "a b c d e f g h"), ("2", "i j k l m n"), ("3", "o p")]) + "</Think>\nAnswer: 7"


def _good(llm):
    return [llm.add_request("what is 2+2?", SamplingParams(temperature=0.8, seed=3, max_tokens=40, logprobs=True)),
            llm.add_request("q?", SamplingParams(temperature=0.0, forced_output=FORK, max_tokens=200)),
            llm.add_request("hello", SamplingParams(temperature=0.0, max_tokens=30, parallel=False))]  # fmt: skip


def _drain(llm):
    while llm.has_unfinished():
        llm.step()


def _same(a, b):
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    assert a.position_ids == b.position_ids
    if a.logprobs is not None:
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_abort_mid_fork_frees_every_slot_and_leaves_the_others_unchanged(pair, tok):
    ref = engine(pair[1], tok, num_kv_slots=2048)
    good = _good(ref)
    _drain(ref)
    want = [ref.output(r) for r in good]

    llm = engine(pair[1], tok, num_kv_slots=2048)
    victim = llm.add_request("q?", SamplingParams(temperature=0.0, forced_output=FORK, max_tokens=200))
    good = _good(llm)
    while not any(b.status is Status.RUNNING and b.parent is not None for b in victim.branches()):
        llm.step()
    llm.step()  # the children have written something
    held = sum(len(llm.kv.held(b)) for b in victim.branches())
    assert held > 0 and victim.root.children
    free_before = llm.kv.num_free
    assert llm.abort(victim) is True
    assert victim.finished and victim.finish_reason == "abort" and victim not in llm.requests
    assert llm.kv.num_free > free_before  # the branches' own slots are back (the prompt may stay cached)
    llm.check_invariants()
    assert llm.abort(victim) is False and llm.abort(victim.id) is False  # idempotent
    out = llm.output(victim)
    assert out.finish_reason == "abort" and out.text and FORK.startswith(out.text[:20])
    assert out.usage.blocks == 0 or out.tree["blocks"]
    _drain(llm)
    for r, w in zip(good, want, strict=True):
        _same(llm.output(r), w)
    assert_no_leak(llm)


def test_abort_by_id_before_it_ran_and_unknown_ids(pair, tok):
    llm = engine(pair[1], tok, num_kv_slots=512)
    req = llm.add_request("a prompt", SamplingParams(temperature=0.0, max_tokens=20))
    assert llm.abort(req.id) is True
    out = llm.output(req)
    assert out.finish_reason == "abort" and out.token_ids == [] and out.text == ""
    assert llm.abort(12345) is False and not llm.has_unfinished()
    assert_no_leak(llm)


def test_abort_a_finished_request_is_false(pair, tok):
    llm = engine(pair[1], tok, num_kv_slots=512)
    out = llm.generate("a prompt", SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert out.finish_reason in ("length", "stop")
    assert llm.abort(0) is False
    assert_no_leak(llm)


def test_abort_while_preempted(pair, tok):
    llm = engine(pair[1], tok, num_kv_slots=96, prefill_chunk=8, max_batch_tokens=32)
    reqs = [llm.add_request(f"prompt number {i}", SamplingParams(temperature=0.0, forced_output=FORK, max_tokens=200))
            for i in range(3)]  # fmt: skip
    for _ in range(40):
        llm.step()
        if llm.scheduler.num_preemptions:
            break
    for r in reqs:
        llm.abort(r)
    assert not llm.requests
    assert_no_leak(llm)
