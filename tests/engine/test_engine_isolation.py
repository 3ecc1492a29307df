"""Failure isolation and input validation: bad SamplingParams are refused at construction with
the field named, an exception in one request's processing finishes only that request
(``finish_reason="error"``), inputs past the model's context or the KV pool are refused at
``add_request``, stop strings split across tokens."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, engine  # noqa: E402

from multiverse import SamplingParams  # noqa: E402
from multiverse.engine import sampling  # noqa: E402
from multiverse.engine.llm import LLM  # noqa: E402

BAD_PARAMS = [
    ({"seed": "abc"}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"),
    ({"temperature": 1e-45}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": "1"}, "temperature"),
    ({"temperature": -1.0}, "temperature"), ({"top_p": math.nan}, "top_p"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": 2.5}, "top_k"), ({"top_k": 0}, "top_k"), ({"max_tokens": 1e9}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "10"}, "max_tokens"),
    ({"max_total_tokens": 2.0}, "max_total_tokens"), ({"max_total_tokens": 0}, "max_total_tokens"),
    ({"stop": [1, 2]}, "stop"), ({"stop": 3}, "stop"), ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"logprobs": "yes"}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs"), ({"parallel": "no"}, "parallel"),
    ({"max_depth": None}, "max_depth"), ({"forced_output": 3}, "forced_output"),
]  # fmt: skip


@pytest.mark.parametrize(("kw", "field"), BAD_PARAMS)
def test_bad_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_good_sampling_params_still_accepted():
    SamplingParams(temperature=0, top_p=1, seed=0, stop="x", stop_token_ids=(1, 2), logprobs=5, max_total_tokens=7)
    SamplingParams(temperature=sampling.MIN_TEMPERATURE, seed=-3, stop=["a", "b"], logprobs=True)
    assert SamplingParams(max_tokens=10).total_budget == sampling.TOTAL_TOKENS_FACTOR * 10
    assert SamplingParams(max_tokens=10, max_total_tokens=3).total_budget == 3


FORK = "<Think>\n" + block([("1", "a b c"), ("2", "d e f g")]) + "</Think>\nAnswer: 1"
MARK = 0.777  # the temperature of the request whose sampling raises


def _batch(llm, with_bad: bool):
    reqs = [llm.add_request("what?", SamplingParams(temperature=0.9, seed=5, max_tokens=30, logprobs=True)),
            llm.add_request("q?", SamplingParams(temperature=0.0, forced_output=FORK, max_tokens=200)),
            llm.add_request("plain", SamplingParams(temperature=0.0, max_tokens=20, parallel=False))]  # fmt: skip
    if with_bad:
        reqs.insert(1, llm.add_request("bad one", SamplingParams(temperature=MARK, seed=1, max_tokens=40, ignore_eos=True)))
    while llm.has_unfinished():
        llm.step()
    return [llm.output(r) for r in reqs]


def test_a_request_that_raises_in_sampling_fails_alone(pair, tok, monkeypatch):
    want = _batch(engine(pair[1], tok, num_kv_slots=2048), with_bad=False)
    draw = sampling._draw_rows
    calls = {"n": 0}

    def flaky(scores, params, streams):
        if any(p.temperature == MARK for p in params):
            calls["n"] += 1
            if calls["n"] >= 4:  # in the middle of its generation, batched with the others
                raise RuntimeError("boom in sampling")
        return draw(scores, params, streams)

    monkeypatch.setattr(sampling, "_draw_rows", flaky)
    llm = engine(pair[1], tok, num_kv_slots=2048)
    outs = _batch(llm, with_bad=True)
    bad = outs.pop(1)
    assert bad.finish_reason == "error" and "boom in sampling" in bad.error and len(bad.token_ids) == 3
    for got, ref in zip(outs, want, strict=True):
        assert got.token_ids == ref.token_ids and got.finish_reason == ref.finish_reason and got.error is None
        if ref.logprobs is not None:
            assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert_no_leak(llm)


def test_a_request_that_raises_in_the_runner_fails_alone(pair, tok, monkeypatch):
    want = _batch(engine(pair[1], tok, num_kv_slots=2048), with_bad=False)
    llm = engine(pair[1], tok, num_kv_slots=2048)
    run = llm.runner.run
    state = {"steps": 0}

    def flaky(works):
        state["steps"] += 1
        if state["steps"] > 3 and any(w.branch.request.params.temperature == MARK for w in works):
            raise RuntimeError("boom in the forward")
        return run(works)

    monkeypatch.setattr(llm.runner, "run", flaky)
    outs = _batch(llm, with_bad=True)
    bad = outs.pop(1)
    assert bad.finish_reason == "error" and "boom in the forward" in bad.error
    for got, ref in zip(outs, want, strict=True):
        assert got.token_ids == ref.token_ids and got.finish_reason == ref.finish_reason
    assert_no_leak(llm)


def test_prompt_longer_than_the_context_or_the_pool_is_refused(pair, tok):
    llm = engine(pair[1], tok, num_kv_slots=4096)
    ctx = pair[1].config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        llm.add_request([5] * (ctx + 1), SamplingParams(max_tokens=4))
    small = engine(pair[1], tok, num_kv_slots=64)
    with pytest.raises(ValueError, match="KV pool"):
        small.add_request([5] * 64, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        llm.add_request("hi", SamplingParams(max_tokens=ctx + 1))
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.add_request("hi", {"max_tokens": 3})
    assert not llm.requests and not small.requests
    out = llm.generate("hi", SamplingParams(temperature=0.0, max_tokens=ctx - 8))[0]  # at the limit: fine
    assert out.usage.depth_tokens <= ctx - 8


@pytest.mark.parametrize("slots", [0, -5, 2.5, True])
def test_num_kv_slots_must_be_a_positive_integer(pair, tok, slots):
    with pytest.raises(ValueError, match="num_kv_slots"):
        LLM.from_model(pair[1], tok, num_kv_slots=slots)


def test_stop_string_split_across_tokens(pair, tok):
    text = "alpha beta STOP gamma"
    stop = "ta ST"
    ids = tok.encode(text, add_special_tokens=False)
    assert not any(stop in tok.decode([t]) for t in ids)  # no single token holds it
    llm = engine(pair[1], tok, num_kv_slots=512)
    out = llm.generate(["q"], SamplingParams(temperature=0.0, forced_output=text, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == "alpha be"
    assert_no_leak(llm)
