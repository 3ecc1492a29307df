"""Misbehaving "models" (forced outputs) and limits: every request returns, limits hold, no hang,
no leak, and the central invariant still holds for whatever the engine produced."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, check_output, engine  # noqa: E402

from multiverse import SamplingParams, grammar  # noqa: E402
from multiverse.engine.request import Status  # noqa: E402


def _run(pair, tok, text, slots=4096, **kw):
    llm = engine(pair[1], tok, num_kv_slots=slots)
    kw.setdefault("max_tokens", 2000)
    out = llm.generate(["q?"], SamplingParams(temperature=0.0, forced_output=text, logprobs=True, **kw))[0]
    check_output(pair[0], tok, out)
    assert out.usage.depth_tokens <= kw["max_tokens"]
    assert_no_leak(llm)
    return out


def _nested(depth: int) -> str:
    body = "leaf"
    for d in range(depth, 0, -1):
        label = ".".join(["1"] * d)
        sibling = ".".join(["1"] * (d - 1) + ["2"])
        body = "go\n" + block([(label, body), (sibling, "s")])
    return "<Think>\n" + body + "</Think>\n\nAnswer: 1"


def test_goal_without_outline_is_not_forked(pair, tok):
    text = "<Think>\n<Parallel>\n<Goal>\n</Goal>\n<Path>\n1: x\n</Path>\n<Conclusion>\nc\n</Conclusion>\n</Parallel>\nend</Think>"
    out = _run(pair, tok, text)
    assert out.text == text and out.usage.blocks == 0  # the </Path> did not end the request
    assert out.finish_reason == "stop"


def test_hundred_outlines_refused_then_sequential(pair, tok):
    text = "<Think>\n" + block([(str(i), f"p{i}") for i in range(1, 101)]) + "</Think>"
    out = _run(pair, tok, text)
    assert out.text == text and out.usage.blocks == 0
    assert out.usage.parallel_degree > 1.5  # the layout still overlaps the 100 sequential paths


def test_hundred_paths_fork_when_allowed(pair, tok):
    text = "<Think>\n" + block([(str(i), f"p{i}") for i in range(1, 101)]) + "</Think>"
    out = _run(pair, tok, text, max_paths=100, max_live_branches=100)
    assert out.text == text and out.usage.blocks == 1 and out.usage.branches == 100


def test_nesting_ten_deep_is_cut_at_max_depth(pair, tok):
    text = _nested(10)
    assert grammar.validate(text) == []
    out = _run(pair, tok, text, max_depth=4)
    assert out.text == text
    assert out.usage.blocks == 4  # levels 5..10 were written sequentially inside the level-4 paths


def test_path_that_never_closes_hits_the_depth_budget(pair, tok):
    text = "<Think>\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>\n"
    text += "<Path>\n1:" + " word" * 300
    out = _run(pair, tok, text, max_tokens=60)
    assert out.usage.depth_tokens <= 60
    assert out.usage.blocks == 1 and out.text.count(" word") < 60
    closing = tok.decode(out.token_ids, skip_special_tokens=False)
    assert closing.count("</Path>\n") == 2 and "<Conclusion>\n" in closing


def test_eos_inside_a_path_closes_that_path(pair, tok):
    text = "<Think>\n" + block([("1", "stop here<|endoftext|> never seen"), ("2", "full path")]) + "</Think>"
    out = _run(pair, tok, text)
    s = tok.decode(out.token_ids, skip_special_tokens=False)
    assert "stop here</Path>\n<Path>\n2: full path\n</Path>\n<Conclusion>" in s
    assert "never seen" not in s
    i = out.token_ids.index(grammar.tag_ids(tok)["</Path>"])
    assert out.forced[i] and out.forced[i + 1]  # the engine closed path 1 itself


def test_breaking_tag_in_a_child_ends_it(pair, tok):
    text = ("<Think>\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>\n"
            "<Path>\n1: one <Conclusion> oops\n</Path>\n<Path>\n2: two\n</Path>\n<Conclusion>\nc\n</Conclusion>\n</Parallel>\n</Think>")  # fmt: skip
    out = _run(pair, tok, text)
    assert out.usage.blocks == 1
    assert "1: one</Path>" in tok.decode(out.token_ids, skip_special_tokens=False).replace(" </Path>", "</Path>")


def test_max_total_tokens_bounds_all_branches(pair, tok):
    text = "<Think>\n" + block([(str(i), "x " * 30) for i in range(1, 9)]) + "</Think>"
    for budget in (20, 40, 90, 200):
        out = _run(pair, tok, text, max_total_tokens=budget)
        assert out.usage.completion_tokens <= budget, budget


def test_max_live_branches_holds_while_running(pair, tok):
    text = _nested(3)
    llm = engine(pair[1], tok, num_kv_slots=4096)
    req = llm.add_request("q", SamplingParams(temperature=0.0, max_tokens=500, forced_output=text, max_live_branches=3))
    peak = 0
    while llm.has_unfinished():
        llm.step()
        live = [b for b in req.root.preorder() if b.status in (Status.RUNNING, Status.FORKING, Status.CLOSING)]
        peak = max(peak, len(live))
    assert peak <= 3 and req.num_blocks >= 1
    assert_no_leak(llm)


def test_request_larger_than_the_pool_returns_truncated(pair, tok):
    llm = engine(pair[1], tok, num_kv_slots=48, prefill_chunk=8, max_batch_tokens=16)
    sp = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, parallel=False)
    outs = llm.generate(["a prompt", "another prompt"], sp)
    assert [o.finish_reason for o in outs] == ["kv_capacity"] * 2
    assert all(0 < len(o.token_ids) <= 48 for o in outs)
    assert_no_leak(llm)


def test_fork_that_would_not_fit_the_pool_is_refused(pair, tok):
    text = "<Think>\n" + block([(str(i), "x") for i in range(1, 9)]) + "</Think>"
    goal = text[: text.index("</Goal>\n") + 8]
    slots = 2 + len(tok.encode(goal, add_special_tokens=False)) + 8  # Goal fits, 8 path starts do not
    out = _run(pair, tok, text, slots=slots)
    assert out.usage.blocks == 0 and text.startswith(out.text) and len(out.text) > len(goal)
    assert out.finish_reason == "kv_capacity"  # sequentially, the request outgrows the pool


TAG_CHOICES = ["<Parallel>", "</Parallel>", "<Goal>", "</Goal>", "<Outline>", "</Outline>", "<Path>",
               "</Path>", "<Conclusion>", "</Conclusion>", "\n", "1: ", "2: ", "a", "bc", "<|endoftext|>"]  # fmt: skip


def _random_text(rng: random.Random) -> str:
    if rng.random() < 0.5:  # a plausible block with random damage
        paths = [(str(i), "t" * rng.randint(0, 5)) for i in range(1, rng.randint(2, 5))]
        text = "<Think>\n" + block(paths)
        cut = rng.randint(len(text) // 2, len(text))
        return text[:cut] + "".join(rng.choice(TAG_CHOICES) for _ in range(rng.randint(0, 10)))
    weights = [3, 2, 3, 3, 3, 2, 3, 3, 2, 1, 4, 2, 2, 4, 4, 0.3]
    return "".join(rng.choices(TAG_CHOICES, weights, k=rng.randint(10, 60)))


@pytest.mark.parametrize("seed", range(12))
def test_random_tag_soup_never_breaks_the_engine(pair, tok, seed):
    rng = random.Random(seed)
    llm = engine(pair[1], tok, num_kv_slots=rng.choice([160, 4096]), prefill_chunk=rng.choice([4, 64]))
    texts = [_random_text(rng) for _ in range(3)]
    params = [SamplingParams(temperature=0.0, forced_output=t, logprobs=True, max_tokens=rng.randint(10, 120),
                             max_total_tokens=rng.choice([None, 60]), max_depth=rng.randint(1, 3),
                             max_paths=rng.randint(1, 4), max_live_branches=rng.randint(1, 6)) for t in texts]  # fmt: skip
    outs = llm.generate(["q1", "q22", "q333"], params)
    for out, p in zip(outs, params, strict=True):
        check_output(pair[0], tok, out)
        assert out.usage.depth_tokens <= p.max_tokens
        if p.max_total_tokens is not None:
            assert out.usage.completion_tokens <= p.max_total_tokens
    assert_no_leak(llm)


def test_kv_memory_sizes_the_pool_by_the_bytes_of_one_slot(pair, tok):
    from multiverse.engine.model import KVPool

    per = KVPool.bytes_per_slot(pair[1].config, pair[1].dtype)
    llm = engine(pair[1], tok, kv_memory=300 * per + per // 2)
    assert llm.kv.num_slots == 300
    assert llm.runner.pool.kv.nbytes == 300 * per  # the pool really takes that much
