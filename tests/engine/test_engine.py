"""The engine's central invariant (SPEC 3/4): whatever it forks, merges, caches or preempts,
its positions and logprobs equal ONE transformers forward over the canonical output with the
layout rule's mask and positions. Tiny random Qwen2, CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, check_output, engine  # noqa: E402

from multiverse import SamplingParams  # noqa: E402
from multiverse.engine.request import Status  # noqa: E402


def _llm(pair, tok, **cfg):
    return engine(pair[1], tok, **cfg)


def _think(*parts: str) -> str:
    return "<Think>\n" + "".join(parts) + "</Think>\n\nAnswer: 7"


UNEVEN = _think("first\n", block([("1", "a b c d e f g h"), ("2", "x"), ("3", "y z")]), "after\n")
ONE_PATH = _think(block([("1", "only one path here")]))
EIGHT = _think(block([(str(i), "w" * i) for i in range(1, 9)]))
NESTED3 = _think(block([
    ("1", "deep\n" + block([
        ("1.1", "deeper\n" + block([("1.1.1", "bottom a"), ("1.1.2", "bottom bb")])),
        ("1.2", "side"),
    ])),
    ("2", "flat"),
]), "two blocks\n", block([("1", "again"), ("2", "and again")]))  # fmt: skip


@pytest.mark.parametrize("text", [UNEVEN, ONE_PATH, EIGHT, NESTED3], ids=["uneven", "one", "eight", "nested3"])
def test_forced_multiverse_output_matches_full_forward(pair, tok, text):
    llm = _llm(pair, tok, num_kv_slots=2048)
    sp = SamplingParams(temperature=0.0, max_tokens=600, forced_output=text, logprobs=True)
    out = llm.generate(["Question: 3 + 4?"], sp)[0]
    assert out.text == text
    assert check_output(pair[0], tok, out) > 0
    expect_blocks = text.count("<Parallel>")
    assert out.usage.blocks == expect_blocks
    assert out.usage.branches == text.count("<Path>")
    assert out.usage.completion_tokens == len(out.token_ids)
    assert out.usage.depth_tokens == max(out.position_ids) + 1 - len(out.prompt_token_ids)
    assert out.usage.parallel_degree > 1.0 or text == ONE_PATH
    # the engine inserted exactly the fork/join tokens: per path "<Path>\nN:" + "\n", per block
    # "\n" after </Goal> and "<Conclusion>\n"
    inserted = [t for t, f in zip(out.token_ids, out.forced, strict=True) if f]
    assert tok.decode(inserted, skip_special_tokens=False).count("<Path>") == text.count("<Path>")
    assert tok.decode(inserted, skip_special_tokens=False).count("<Conclusion>") == expect_blocks
    assert out.finish_reason == "stop"
    assert_no_leak(llm)


def test_cascade_attention_keeps_logprobs_equal_to_the_full_forward(pair, tok):
    """Shared-prefix decode attention forced on (every sibling group, however small): the
    engine's logprobs still equal one full forward, nested blocks and preemption included."""
    for text in (UNEVEN, EIGHT, NESTED3):
        llm = _llm(pair, tok, num_kv_slots=2048)
        llm.runner.cascade, llm.runner.cascade_min_saved_rows = True, 0
        sp = SamplingParams(temperature=0.0, max_tokens=600, forced_output=text, logprobs=True)
        out = llm.generate(["Question: 3 + 4?"], sp)[0]
        assert out.text == text and check_output(pair[0], tok, out) > 0
        assert llm.runner.cascade_steps > 0
        assert_no_leak(llm)
    prompts, params = _mixed_batch()
    small = _llm(pair, tok, num_kv_slots=400, max_batch_tokens=64, prefill_chunk=16)
    small.runner.cascade, small.runner.cascade_min_saved_rows = True, 0
    for out in small.generate(prompts, params):
        check_output(pair[0], tok, out)
    assert small.scheduler.num_preemptions > 0 and small.runner.cascade_steps > 0
    assert_no_leak(small)


def test_tree_records_paths_in_outline_order(pair, tok):
    llm = _llm(pair, tok, num_kv_slots=2048)
    out = llm.generate(["q"], SamplingParams(temperature=0.0, max_tokens=600, forced_output=NESTED3))[0]
    top = out.tree["blocks"]
    assert [p["label"] for p in top[0]["paths"]] == ["1", "2"]
    inner = top[0]["paths"][0]["blocks"][0]
    assert [p["label"] for p in inner["paths"]] == ["1.1", "1.2"]
    deepest = inner["paths"][0]["blocks"][0]
    assert [p["label"] for p in deepest["paths"]] == ["1.1.1", "1.1.2"]
    path = deepest["paths"][1]
    assert tok.decode(out.token_ids[path["start"] : path["end"]], skip_special_tokens=False) == (
        "<Path>\n1.1.2: bottom bb\n</Path>\n"
    )
    assert [p["label"] for p in top[1]["paths"]] == ["1", "2"]


def test_parallel_off_equals_transformers_greedy(pair, tok):
    hf, _ = pair
    llm = _llm(pair, tok, num_kv_slots=1024)
    prompts = ["The sum of 3 and 4 is", "<Parallel>\n<Path>\nold tags are plain tokens here"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, parallel=False,
                                                ignore_eos=True, logprobs=True))  # fmt: skip
    for p, out in zip(prompts, outs, strict=True):
        ids = tok.encode(p, add_special_tokens=False)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))  # fmt: skip
        assert out.token_ids == ref[0, len(ids) :].tolist()
        assert out.usage.parallel_degree == 1.0 and out.usage.depth_tokens == 24
        check_output(hf, tok, out, parallel=False)
    assert_no_leak(llm)


def _structured_prompt(tok):
    chat = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": _think(block([("1", "two"), ("2", "three three")]))},
        {"role": "user", "content": "And 4+5?"},
    ]
    return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("chunk", [7, 512])
def test_structured_prompt_logprobs_and_continuation(pair, tok, chunk):
    prompt = _structured_prompt(tok)
    llm = _llm(pair, tok, num_kv_slots=2048, prefill_chunk=chunk)
    sp = SamplingParams(temperature=0.0, max_tokens=120, forced_output=UNEVEN, logprobs=True, prompt_logprobs=True)
    out = llm.generate([prompt], sp)[0]
    assert sum(lp is not None for lp in out.prompt_logprobs) == len(out.prompt_token_ids) - 1
    check_output(pair[0], tok, out)
    assert_no_leak(llm)


def test_prefix_cache_hits_keep_results_identical(pair, tok):
    prompt = _structured_prompt(tok)
    llm = _llm(pair, tok, num_kv_slots=4096, prefill_chunk=16)
    sp = SamplingParams(temperature=0.0, max_tokens=60, logprobs=True)
    first = llm.generate([prompt + "a"], sp)[0]
    cached = llm.radix.num_cached_tokens()
    assert cached >= len(first.prompt_token_ids)
    again = llm.generate([prompt + "a", prompt + "b"], sp)
    assert llm.radix.num_cached_tokens() > cached  # the second prompt's tail was added
    assert again[0].token_ids == first.token_ids
    for out in again:
        check_output(pair[0], tok, out)
    cold = _llm(pair, tok, num_kv_slots=4096, enable_prefix_cache=False).generate([prompt + "b"], sp)[0]
    assert cold.token_ids == again[1].token_ids
    assert_no_leak(llm)


def _mixed_batch():
    texts = [UNEVEN, EIGHT, NESTED3, ONE_PATH, None, None]
    params = []
    for i, text in enumerate(texts):
        kw = dict(max_tokens=300, logprobs=True, seed=100 + i)
        if text is None:
            params.append(SamplingParams(temperature=1.0, top_k=50, top_p=0.9, **kw))
        else:
            params.append(SamplingParams(temperature=0.0, forced_output=text, **kw))
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(len(texts))]
    return prompts, params


def test_many_concurrent_requests_and_preemption_give_identical_results(pair, tok):
    prompts, params = _mixed_batch()
    big = _llm(pair, tok, num_kv_slots=8192)
    ref = big.generate(prompts, params)
    for out in ref:
        check_output(pair[0], tok, out)
    alone = [big.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert [o.token_ids for o in alone] == [o.token_ids for o in ref]  # batch-independent
    assert_no_leak(big)
    small = _llm(pair, tok, num_kv_slots=400, max_batch_tokens=64, prefill_chunk=16)
    got = small.generate(prompts, params)
    assert small.scheduler.num_preemptions > 0
    for a, b in zip(got, ref, strict=True):
        assert a.finish_reason == b.finish_reason != "kv_capacity"
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
        assert a.forced == b.forced
        check_output(pair[0], tok, a)
    assert_no_leak(small)


def test_zero_copy_slots_in_use_equal_prefix_plus_branch_tokens(pair, tok):
    llm = _llm(pair, tok, num_kv_slots=2048, enable_prefix_cache=False)
    text = _think(block([("1", "a b c d e f"), ("2", "x y"), ("3", "p q r s")]))
    req = llm.add_request("q?", SamplingParams(temperature=0.0, max_tokens=300, forced_output=text))
    seen_fork = seen_merge = False
    while llm.has_unfinished():
        llm.step()
        llm.kv.check_invariants()
        root = req.root
        if req.finished:
            break
        if root.children:
            seen_fork = True
            own = sum(len(c.kv) - c.prefix_len for c in root.children)
            assert llm.kv.num_used == len(root.kv) + own
            for c in root.children:  # each child reads the parent's very slots
                assert c.kv[: c.prefix_len] == root.kv
        elif seen_fork and not seen_merge:
            seen_merge = True
            assert llm.kv.num_used == len(root.kv)  # merged: nothing copied, nothing dropped
    assert seen_fork and seen_merge
    assert_no_leak(llm)


def test_refused_fork_continues_sequentially_with_the_layout_mask(pair, tok):
    """max_paths=2 refuses a 3-path block: the root writes the paths itself, sequentially, and
    must still attend by the layout rule (path 2 does not see path 1)."""
    llm = _llm(pair, tok, num_kv_slots=2048)
    sp = SamplingParams(temperature=0.0, max_tokens=400, forced_output=UNEVEN, logprobs=True, max_paths=2)
    out = llm.generate(["q"], sp)[0]
    assert out.text.startswith("<Think>\nfirst\n<Parallel>")
    assert out.usage.blocks == 0 and out.usage.branches == 0
    assert out.usage.forced_tokens == 1  # only the "\n" after </Goal>
    assert out.usage.parallel_degree > 1.0  # the layout still overlaps the paths
    assert check_output(pair[0], tok, out) > 0
    assert_no_leak(llm)


def test_prompt_ending_inside_a_path_decodes_with_the_mask(pair, tok):
    head = "<Think>\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>\n"
    prompt = head + "<Path>\n1: first path\n</Path>\n<Path>\n2: second"
    llm = _llm(pair, tok, num_kv_slots=1024)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=True))[0]
    assert check_output(pair[0], tok, out) == len(out.token_ids) > 5  # every token sampled, all checked
    assert out.usage.depth_tokens <= 20
    assert_no_leak(llm)


def test_request_status_after_generate(pair, tok):
    llm = _llm(pair, tok, num_kv_slots=512)
    req = llm.add_request("x", SamplingParams(temperature=0.0, max_tokens=5))
    while llm.has_unfinished():
        llm.step()
    assert req.finished and req.root.status is Status.FINISHED and req.finish_reason == "length"


def test_requests_join_between_steps(pair, tok):
    """Continuous batching: a request added while another is mid-fork gets the same result as
    when it runs alone."""
    prompts, params = _mixed_batch()
    llm = _llm(pair, tok, num_kv_slots=4096)
    first = llm.add_request(prompts[0], params[0])
    while not first.root.children:  # run until it has forked
        llm.step()
    late = llm.add_request(prompts[1], params[1])
    while llm.has_unfinished():
        llm.step()
    alone = _llm(pair, tok, num_kv_slots=4096).generate(prompts[:2], params[:2])
    assert llm.output(first).token_ids == alone[0].token_ids
    assert llm.output(late).token_ids == alone[1].token_ids
    check_output(pair[0], tok, llm.output(late))
    assert_no_leak(llm)
