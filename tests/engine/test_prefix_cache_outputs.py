"""The prefix cache keeps finished outputs (:mod:`multiverse.engine.radix`, What may be cached):
a follow-up request that extends a finished request's output prefills only its new tokens, and
gives the tokens and logprobs of a cold engine. Tiny random Qwen2, CPU, invariants every step."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, check_output, engine  # noqa: E402

from multiverse import SamplingParams  # noqa: E402

PROMPT = list(range(200, 220))
FORKED = "<Think>\n" + block([("1", "a b"), ("2", "x y z")], conclusion="cc") + "</Think>\n\nAnswer: 1"


def _follow_up(parallel: bool = True) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=True, parallel=parallel)


def _prefilled(llm, prompt: list[int], sp: SamplingParams):
    """Generate ``prompt`` alone; (its output, how many of its prompt tokens were computed)."""
    computed: list[int] = []
    run = llm.runner.run

    def spy(works):
        computed.extend(w.count for w in works if w.branch.parent is None and w.start < len(prompt))
        return run(works)

    llm.runner.run = spy
    try:
        out = llm.generate(prompt, sp)[0]
    finally:
        llm.runner.run = run
    return out, sum(computed)


def _cold(pair, tok, prompt: list[int], sp: SamplingParams):
    return engine(pair[1], tok, num_kv_slots=512, enable_prefix_cache=False).generate(prompt, sp)[0]


def _same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_a_follow_up_of_a_plain_output_prefills_only_its_new_tokens(pair, tok):
    llm = engine(pair[1], tok, num_kv_slots=512)
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, parallel=False)
    first = llm.generate(PROMPT, sp)[0]
    follow = PROMPT + first.token_ids + [300, 301]
    out, prefilled = _prefilled(llm, follow, _follow_up(parallel=False))
    assert prefilled == 2  # old code: 14 (the prompt was cached, not the 12 tokens written)
    _same(out, _cold(pair, tok, follow, _follow_up(parallel=False)))
    check_output(pair[0], tok, out, parallel=False)
    assert_no_leak(llm)


def test_a_follow_up_of_a_forked_output_reuses_every_path(pair, tok):
    # the merged root's K/V list (prefix + path 1 + path 2 + Conclusion) is the layout rule's
    llm = engine(pair[1], tok, num_kv_slots=512)
    forced = tok.encode(FORKED, add_special_tokens=False)
    first = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=len(forced) + 4,
                                                forced_output=forced))[0]  # fmt: skip
    assert first.usage.blocks == 1 and first.usage.parallel_degree > 1
    follow = PROMPT + first.token_ids + [300, 301]
    out, prefilled = _prefilled(llm, follow, _follow_up())
    assert prefilled == 2
    _same(out, _cold(pair, tok, follow, _follow_up()))
    check_output(pair[0], tok, out)  # positions and logprobs of a full forward by the layout rule
    assert_no_leak(llm)


def test_the_drivers_map_then_path_requests_hit_the_map_tokens(pair, tok):
    # the remote driver's exact mode: Map stops at </Goal> (the stop token is not computed),
    # each path request is context + "</Goal>\n<Path>\n{label}:"; a namespace is per layout rule
    llm = engine(pair[1], tok, num_kv_slots=512)
    goal_end = tok.convert_tokens_to_ids("</Goal>")
    head = tok.encode("<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n",
                      add_special_tokens=False)  # fmt: skip
    stop = SamplingParams(temperature=0.0, max_tokens=len(head) + 2, forced_output=head + [goal_end],
                          stop_token_ids=[goal_end], max_depth=0)  # fmt: skip
    mapped = llm.generate(PROMPT, stop)[0]
    assert mapped.token_ids == head and mapped.finish_reason == "stop"
    starts = [tok.encode(f"</Goal>\n<Path>\n{label}:", add_special_tokens=False) for label in ("1", "2")]
    assert starts[0][:-2] == starts[1][:-2] and starts[0][-2:] != starts[1][-2:]  # "{label}:" differs
    for start, expect in zip(starts, (len(starts[0]), 2), strict=True):  # path 2: path 1's request
        path = PROMPT + head + start  # cached "</Goal>\n<Path>\n" as well
        out, prefilled = _prefilled(llm, path, _follow_up())
        assert prefilled == expect  # old code: the Map tokens as well (len(head) more)
        _same(out, _cold(pair, tok, path, _follow_up()))
    plain = PROMPT + head + [300]  # the same ids laid out causally: another namespace
    assert _prefilled(llm, plain, _follow_up(parallel=False))[1] == len(plain)  # no hit at all
    assert_no_leak(llm)


def test_an_aborted_request_leaves_its_tokens_and_a_failed_one_none(pair, tok):
    llm = engine(pair[1], tok, num_kv_slots=512)
    sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, parallel=False)
    req = llm.add_request(PROMPT, sp)
    for _ in range(6):
        llm.step()
    assert llm.abort(req)
    assert llm.radix.num_cached_tokens() == len(PROMPT) + 5  # the 6th token was sampled, not computed
    fail = engine(pair[1], tok, num_kv_slots=512)
    req = fail.add_request(PROMPT, sp)
    for _ in range(3):
        fail.step()
    fail.runner.run = lambda works: (_ for _ in ()).throw(RuntimeError("boom"))
    fail.step()
    assert req.finish_reason == "error"
    assert fail.radix.num_cached_tokens() == len(PROMPT)  # the prompt, cached when computed
    assert_no_leak(llm)
    assert_no_leak(fail)
