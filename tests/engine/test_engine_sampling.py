"""Sampling, stopping and the public API surface: seeds, top-k/top-p, stop strings/ids, EOS,
chat, loading from a directory, clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, check_output, engine, tiny_pair  # noqa: E402

from multiverse import LLM, SamplingParams  # noqa: E402
from multiverse.engine import sampling  # noqa: E402
from multiverse.engine.sampling import branch_seed, sample, uniform  # noqa: E402


@pytest.fixture()
def llm(pair, tok):
    return engine(pair[1], tok, num_kv_slots=4096)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm, pair, tok):
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=30, seed=7, logprobs=True, ignore_eos=True)
    a = llm.generate(["x"], sp)[0]
    b = llm.generate(["y", "x", "z"], [SamplingParams(temperature=1.0, max_tokens=30, seed=1), sp,
                                       SamplingParams(temperature=0.5, max_tokens=9)])[1]  # fmt: skip
    assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    c = llm.generate(["x"], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=30, seed=8, ignore_eos=True))[0]
    assert c.token_ids != a.token_ids
    check_output(pair[0], tok, a)


def test_children_draw_from_their_own_seeded_streams(llm, pair, tok):
    # force the Goal only: the two paths then sample freely, each with its own generator
    goal = "<Think>\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>\n<Path>\n1:"
    forced = tok.encode(goal, add_special_tokens=False)
    sp = SamplingParams(temperature=1.0, max_tokens=40, seed=3, logprobs=True, max_total_tokens=120)
    outs = [llm.generate(["q"], SamplingParams(**{**_fields(sp), "forced_output": forced}))[0] for _ in range(2)]
    assert outs[0].token_ids == outs[1].token_ids and outs[0].usage.blocks == 1
    check_output(pair[0], tok, outs[0])
    assert branch_seed(3, ("1",)) != branch_seed(3, ("2",)) and branch_seed(3, ()) == 3


def _fields(sp):
    return {f: getattr(sp, f) for f in sp.__slots__}


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = llm.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True))[0]
    for sp in (SamplingParams(temperature=2.0, top_k=1, max_tokens=15, seed=1, ignore_eos=True),
               SamplingParams(temperature=0.7, top_p=1e-6, max_tokens=15, seed=1, ignore_eos=True)):  # fmt: skip
        assert llm.generate(["abc"], sp)[0].token_ids == greedy.token_ids


def test_sampler_forced_rows_and_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    greedy = SamplingParams(temperature=0.0)
    toks, lps = sample(logits, [greedy, greedy], [None, None], [None, 2], [True, True])
    assert toks == [1, 2]
    ref = torch.log_softmax(logits, -1)
    assert lps == pytest.approx([ref[0, 1].item(), ref[1, 2].item()])
    toks, lps = sample(logits[:1], [greedy], [None], [-1], [True])
    assert toks == [-1] and lps == [None]


def test_greedy_rows_take_their_argmax_whether_or_not_every_row_is_greedy():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3))
    greedy, drawn = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)
    want = logits.argmax(-1).tolist()
    toks, _ = sample(logits, [greedy] * 5, [None] * 5, [None] * 5, [False] * 5)
    assert toks == want
    mixed, _ = sample(logits, [greedy, drawn] * 2 + [greedy], [None, (1, 0), None, (1, 1), None],
                      [None] * 5, [False] * 5)  # fmt: skip
    assert [mixed[r] for r in (0, 2, 4)] == [want[r] for r in (0, 2, 4)]


def test_draws_are_splitmix64_streams():
    # splitmix64's first output from state 0 is 0xE220A8397B1DCDAF (the published sequence)
    assert uniform(0, 0) == (0xE220A8397B1DCDAF >> 11) * 2.0**-53
    draws = [uniform(12345, n) for n in range(2000)]
    assert all(0.0 <= u < 1.0 for u in draws) and len(set(draws)) == 2000
    assert abs(sum(draws) / 2000 - 0.5) < 0.02


@pytest.mark.parametrize("kw, expect", [
    (dict(temperature=1.0), None),
    (dict(temperature=0.5), None),
    (dict(temperature=1.0, top_k=2), [0.0, 0.0, 0.5, 0.5]),
    (dict(temperature=1.0, top_p=0.75), [0.0, 0.0, 0.5, 0.5]),
], ids=["t1", "t0.5", "top-k", "top-p"])  # fmt: skip
def test_batched_draws_follow_the_distribution(kw, expect):
    logits = torch.log(torch.tensor([0.1, 0.15, 0.375, 0.375]))
    sp = SamplingParams(seed=0, **kw)
    n = 20000
    toks, _ = sample(logits.expand(n, 4).contiguous(), [sp] * n, [(99, i) for i in range(n)], [None] * n, [False] * n)
    freq = torch.bincount(torch.tensor(toks), minlength=4).double() / n
    want = torch.softmax(logits.double() / sp.temperature, -1) if expect is None else torch.tensor(expect, dtype=torch.float64)
    assert (freq - want).abs().max() < 0.015, (freq, want)
    # a row's token depends on its own stream only, not on the rows next to it
    alone, _ = sample(logits[None], [sp], [(99, 17)], [None], [False])
    assert alone[0] == toks[17]


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-53])
def test_a_draw_never_takes_a_dropped_token(monkeypatch, u):
    monkeypatch.setattr(sampling, "uniform", lambda seed, counter: u)
    logits = torch.tensor([[3.0, -1e9, 2.0, 1.0, 0.5]])
    for sp in (SamplingParams(top_k=2), SamplingParams(top_p=0.5), SamplingParams()):
        toks, _ = sample(logits, [sp], [(1, 0)], [None], [False])
        assert toks[0] in ({0, 2} if sp.top_k == 2 else {0} if sp.top_p < 1 else {0, 2, 3, 4})


def test_stop_strings_stop_token_ids_and_eos(llm, tok):
    text = "alpha beta STOP gamma"
    out = llm.generate(["q"], SamplingParams(temperature=0.0, forced_output=text, stop=["STOP"]))[0]
    assert out.text == "alpha beta " and out.finish_reason == "stop"
    stop_id = tok.encode(" gamma", add_special_tokens=False)[0]
    out = llm.generate(["q"], SamplingParams(temperature=0.0, forced_output=text, stop_token_ids=[stop_id]))[0]
    assert out.text == "alpha beta STOP" and out.finish_reason == "stop"
    out = llm.generate(["q"], SamplingParams(temperature=0.0, forced_output="ab<|endoftext|>cd"))[0]
    assert out.text == "ab" and out.finish_reason == "stop"
    out = llm.generate(["q"], SamplingParams(temperature=0.0, forced_output="ab<|endoftext|>cd", ignore_eos=True))[0]
    assert out.text == "ab<|endoftext|>cd"


def test_stop_string_inside_a_path_ends_only_that_path(llm, tok):
    text = "<Think>\n" + block([("1", "one STOP more"), ("2", "two")]) + "</Think>"
    out = llm.generate(["q"], SamplingParams(temperature=0.0, forced_output=text, stop=["STOP"]))[0]
    s = tok.decode(out.token_ids, skip_special_tokens=False)
    assert "1: one STOP</Path>\n<Path>\n2: two\n</Path>" in s and out.finish_reason == "stop"


def test_prompts_as_token_ids_and_prompt_logprobs(llm, pair, tok):
    ids = tok.encode("hello there", add_special_tokens=False)
    outs = llm.generate([ids, "hello there"], SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=True))
    assert outs[0].token_ids == outs[1].token_ids and outs[0].prompt is None
    assert outs[0].prompt_logprobs == pytest.approx(outs[1].prompt_logprobs)
    check_output(pair[0], tok, outs[0])


def test_chat_applies_the_template(llm, tok):
    msgs = [{"role": "user", "content": "hi"}]
    out = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=4))[0]
    expect = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expect and out.outputs[0] is out


def test_llm_from_a_saved_directory(pair, tok, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), num_kv_slots=512, check_invariants=True)
    text = "<Think>\n" + block([("1", "a"), ("2", "b")]) + "</Think>"
    out = llm.generate(["q"], SamplingParams(temperature=0.0, forced_output=text, logprobs=True))[0]
    assert out.text == text and out.usage.blocks == 1
    check_output(hf, tok, out)
    assert_no_leak(llm)


def test_bad_input_gives_clear_errors(llm):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([""], SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 10**6]], SamplingParams())
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()])


def _tagless_tokenizer():
    """A tokenizer without the Multiverse tags: one token per letter, ``<eos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)} | {"<eos>": 26}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")


def test_model_without_tags_decodes_plainly(tok):
    t = _tagless_tokenizer()
    _, ours = tiny_pair(t)
    llm = engine(ours, t, num_kv_slots=256)
    out = llm.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.usage.parallel_degree == 1.0
    # EOS ends a plain (tagless) model's request too
    out = llm.generate(["abc"], SamplingParams(temperature=0.0, forced_output=[0, 1, 26, 2, 3]))[0]
    assert out.token_ids == [0, 1] and out.finish_reason == "stop"


def test_stop_strings_work_without_multiverse_tags():
    """Stop strings are matched in the decoded text whatever the tokenizer: a plain model's
    request stops at one too (it used to run to its length, the stop string in its text)."""
    t = _tagless_tokenizer()
    _, ours = tiny_pair(t, seed=2)
    llm = engine(ours, t, num_kv_slots=256)
    free = llm.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    assert free.finish_reason == "length"
    stop = t.decode(free.token_ids[5:7])
    cut = free.text.find(stop)
    assert cut > 0
    out = llm.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:cut]
    assert len(out.token_ids) < len(free.token_ids)
    assert_no_leak(llm)


def test_stop_string_in_the_prompt_is_not_matched(llm):
    """Only generated text is matched: a prompt ending in the stop string does not stop at once."""
    sp = SamplingParams(temperature=0.0, forced_output="alpha beta", stop=["STOP"])
    out = llm.generate(["say STOP"], sp)[0]
    assert out.text == "alpha beta" and out.finish_reason == "stop"


def test_generation_config_eos_ids_are_honoured(pair, tok, tmp_path):
    """A chat model ends turns with <|im_end|>: the directory's generation_config lists it."""
    import json

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, tok.eos_token_id]}))
    llm = LLM(str(tmp_path), num_kv_slots=512, check_invariants=True)
    assert im_end in llm.eos_token_ids and tok.eos_token_id in llm.eos_token_ids
    out = llm.generate(["q"], SamplingParams(temperature=0.0, forced_output="ab<|im_end|>cd"))[0]
    assert out.text == "ab" and out.finish_reason == "stop"
    # no generation_config: the tokenizer's EOS and the chat turn end (engine.policy.end_ids)
    plain = engine(llm.model, tok, num_kv_slots=512)
    assert plain.eos_token_ids == {tok.eos_token_id, im_end}
    out = plain.generate(["q"], SamplingParams(temperature=0.0, forced_output="ab<|im_end|>cd"))[0]
    assert out.text == "ab" and out.finish_reason == "stop"
    out = plain.generate(["q"], SamplingParams(temperature=0.0, forced_output="ab<|im_end|>cd", ignore_eos=True))[0]
    assert out.text == "ab<|im_end|>cd"
