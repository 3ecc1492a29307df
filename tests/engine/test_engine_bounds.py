"""Every request ends: misbehaving "models" (forced outputs) that write structure the engine
cannot make progress on end within their bounds (``max_tokens`` on the depth, the total bound
``SamplingParams.total_budget`` on all branches' tokens) or as ``"malformed"``, with the KV pool
fully free afterwards; a seeded soak of tag soup mixed with good requests."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, check_output, engine  # noqa: E402

from multiverse import SamplingParams  # noqa: E402

GOAL2 = "<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>\n"
CASES = {  # name: (forced output, finish reasons it may end with)
    "path_loop_at_root": ("<Path>\n" * 400, {"length"}),  # ordinary tokens at the root: the depth grows
    "path_loop_after_conclusion": ("<Think>\n" + block([("1", "a"), ("2", "b")])[:-len("</Parallel>\n")]
                                   + "<Path>\n" * 400, {"length"}),  # fmt: skip
    "empty_paths_restarting": ("<Think>\n<Parallel>\n<Goal>\n</Goal>\n" + "<Path>\n" * 400, {"malformed"}),
    "paths_that_never_deepen": ("<Think>\n<Parallel>\n<Goal>\n</Goal>\n" + "<Path>\nx\n" * 400,
                                {"max_total_tokens"}),  # fmt: skip
    "unclosed_goal": ("<Think>\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n" + "x " * 400, {"length"}),
    "never_closes_path": ("<Think>\n" + GOAL2 + "<Path>\n1:" + " word" * 400,  # the paths are cut, then
                          {"length", "max_total_tokens", "stop"}),  # the root's part ends: EOS  # fmt: skip
    "only_parallel": ("<Parallel>" * 400, {"malformed"}),
    "children_loop": ("<Think>\n" + GOAL2 + "<Path>\n1: " + "<Parallel>\n<Goal>\n</Goal>\n<Path>\ny\n" * 100,
                      {"length", "max_total_tokens", "stop"}),  # the root's part ends after the block: EOS
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("max_total", [None, 50])
def test_misbehaving_model_ends_within_its_bound(pair, tok, name, max_total):
    text, reasons = CASES[name]
    llm = engine(pair[1], tok, num_kv_slots=4096)
    sp = SamplingParams(temperature=0.0, forced_output=text, logprobs=True, max_tokens=64, max_total_tokens=max_total)
    req = llm.add_request("q?", sp)
    steps = 0
    while steps < 2 * sp.total_budget + 10:
        steps += 1
        llm.step()
        if req.finished:
            break
    assert req.finished, f"{name}: not finished after {steps} steps"
    out = llm.output(req)
    assert out.usage.completion_tokens <= sp.total_budget and out.usage.depth_tokens <= sp.max_tokens
    if max_total is None:
        assert out.finish_reason in reasons, (name, out.finish_reason, out.text[-80:])
    else:
        assert out.finish_reason in reasons | {"max_total_tokens"}, (name, out.finish_reason)
    check_output(pair[0], tok, out)
    assert_no_leak(llm)


WORDS = ["a", "bc", " the", " 12", "\n", ":", "1: ", "2: ", "x y"]
TAGS = ["<Parallel>", "</Parallel>", "<Goal>", "</Goal>", "<Outline>", "</Outline>", "<Path>", "</Path>",
        "<Conclusion>", "</Conclusion>", "<|endoftext|>"]  # fmt: skip


def _soup(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(TAGS) if rng.random() < 0.4 else rng.choice(WORDS) for _ in range(n))


def _good_params(i: int) -> tuple[str, SamplingParams]:
    if i % 2:
        return f"good prompt {i}", SamplingParams(temperature=0.8, seed=i, max_tokens=24, logprobs=True)
    text = "<Think>\n" + block([("1", f"p{i}"), ("2", "q r")]) + "</Think>\nAnswer: 3"
    return f"good forked {i}", SamplingParams(temperature=0.0, forced_output=text, max_tokens=120, logprobs=True)


@pytest.mark.parametrize("seed", range(3))
def test_soak_tag_soup_with_good_requests(pair, tok, seed):
    """16 requests a seed (12 random prompts with tag-soup outputs, 4 good ones), a small pool
    (preemption), a bounded number of steps: no hang, no leaked slot, good outputs unchanged."""
    rng = random.Random(seed)
    good = [_good_params(i) for i in range(4)]
    ref = engine(pair[1], tok, num_kv_slots=4096)
    want = ref.generate([p for p, _ in good], [sp for _, sp in good])
    llm = engine(pair[1], tok, num_kv_slots=rng.choice([384, 4096]), prefill_chunk=rng.choice([8, 64]))
    reqs, bad = [], []
    for i in range(16):
        if i % 4 == 1:
            reqs.append(llm.add_request(*good[i // 4]))
            continue
        sp = SamplingParams(temperature=0.0, forced_output=_soup(rng, rng.randint(5, 120)), max_tokens=rng.randint(8, 80),
                            max_total_tokens=rng.choice([None, 40]), max_paths=rng.randint(1, 4),
                            max_depth=rng.randint(1, 3), parallel=rng.random() < 0.9)  # fmt: skip
        bad.append(llm.add_request(_soup(rng, rng.randint(1, 12)) or "p", sp))
        reqs.append(bad[-1])
    bound = sum(r.params.total_budget + r.prompt_len for r in reqs) + 100
    steps = 0
    while llm.has_unfinished():
        llm.step()
        steps += 1
        assert steps < bound, f"seed {seed}: not finished after {steps} steps"
    for r in bad:
        out = llm.output(r)
        assert out.usage.completion_tokens <= r.params.total_budget and out.usage.depth_tokens <= r.params.max_tokens
        assert out.finish_reason in {"stop", "length", "max_total_tokens", "malformed", "kv_capacity"}
    outs = [llm.output(r) for r in reqs if r not in bad]
    for got, ref_out in zip(outs, want, strict=True):
        assert got.token_ids == ref_out.token_ids and got.finish_reason == ref_out.finish_reason
        assert got.logprobs == pytest.approx(ref_out.logprobs, abs=1e-4)
    assert_no_leak(llm)
