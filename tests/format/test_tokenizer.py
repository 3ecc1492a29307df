"""Tests for the project's byte-level BPE tokenizer (multiverse.format.tokenizer)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from multiverse.format import grammar
from multiverse.format.tokenizer import load_tokenizer
from multiverse.train.bpe import EOS_TOKEN, IM_END, IM_START, build_tokenizer, default_tokenizer

TAGS = (
    "<Think>", "</Think>", "<Parallel>", "</Parallel>", "<Goal>", "</Goal>",
    "<Outline>", "</Outline>", "<Path>", "</Path>", "<Conclusion>", "</Conclusion>",
)  # fmt: skip

MV_TEXT = (
    "<Think>\nFirst, list the pairs.\nLet's think in parallel.\n<Parallel>\n<Goal>\n"
    "<Outline>\n1: multiply 3 and 4\n</Outline>\n<Outline>\n2: multiply 5 and 6\n</Outline>\n"
    "</Goal>\n<Path>\n1: 3 * 4 = 12.\n</Path>\n<Path>\n2: 5 * 6 = 30.\n</Path>\n"
    "<Conclusion>\nThe products are 12 and 30.\n</Conclusion>\n</Parallel>\n"
    "12 + 30 = 42.\n</Think>\n\nAnswer: 42"
)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def test_tags_are_single_consecutive_tokens_in_order(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in TAGS]
    assert ids == list(range(ids[0], ids[0] + 12))
    assert ids[-1] == len(tok) - 1
    for tag, tid in zip(TAGS, ids, strict=True):
        assert tok.encode(tag, add_special_tokens=False) == [tid]
    # tags written inside text are still single tokens
    enc = tok.encode("x</Goal>\n<Path>\n1:", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("</Goal>") in enc
    assert tok.convert_tokens_to_ids("<Path>") in enc


def test_tags_follow_grammar_order(tok):
    assert tuple(grammar.TAGS) == TAGS
    assert grammar.tag_ids(tok) == {t: tok.convert_tokens_to_ids(t) for t in TAGS}


def test_vocab_size_and_specials(tok):
    assert len(tok) == 512
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == tok.pad_token_id
    for special in (EOS_TOKEN, IM_START, IM_END):
        assert len(tok.encode(special, add_special_tokens=False)) == 1


def test_round_trip_is_exact(tok):
    texts = [
        MV_TEXT,
        "  leading spaces, tabs\tand\r\nwindows newlines\n\n\nand unicode: é ∑ 汉字 🙂",
        "<think>lower-cased tags are ordinary text</think>",
        "",
    ]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_newline_next_to_tags_is_one_token(tok):
    nl = tok.encode("\n", add_special_tokens=False)
    assert len(nl) == 1
    ids = tok.encode(MV_TEXT, add_special_tokens=False)
    tag_ids = {tok.convert_tokens_to_ids(t) for t in TAGS}
    for k, i in enumerate(ids):
        if i in tag_ids and k + 1 < len(ids):
            # every tag in canonical text is followed by exactly the "\n" token
            assert ids[k + 1] == nl[0], tok.convert_ids_to_tokens(ids[k : k + 2])
    # the text the engine inserts at a fork tokenizes the same alone and inside a chain
    inserted = tok.encode("<Path>\n2:", add_special_tokens=False)
    start = ids.index(tok.convert_tokens_to_ids("<Path>"), ids.index(inserted[0]) + 1)
    assert ids[start : start + len(inserted)] == inserted


def test_digits_are_single_tokens(tok):
    ids = tok.encode("1234 + 5678 = 6912", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("123456786912"), pieces


def test_same_ids_through_autotokenizer_with_qwen2_config(tok, tmp_path):
    """transformers loads a tokenizer saved beside a Qwen2 config.json as Qwen2Tokenizer,
    which rebuilds the pre-tokenizer: ours must be the same pipeline."""
    from transformers import AutoTokenizer, Qwen2Config
    from transformers.models.qwen2 import tokenization_qwen2

    from multiverse.train.bpe import PRETOKENIZE_PATTERN

    assert PRETOKENIZE_PATTERN == tokenization_qwen2.PRETOKENIZE_REGEX
    Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)  # fmt: skip
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    text = MV_TEXT + " x 1234 + 5678 = 6912.\n\n  tabs\tand\r\nmore.\n\n\nend"
    assert auto.encode(text) == tok.encode(text)
    assert len(auto) == len(tok)
    assert auto.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False) == (
        tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False)
    )
    assert auto.convert_tokens_to_ids("</Path>") == tok.convert_tokens_to_ids("</Path>")


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
    )


def test_deterministic(tok):
    other = build_tokenizer()
    assert other.get_vocab() == tok.get_vocab()
    assert other.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_deterministic_across_processes(tok):
    code = (
        "import hashlib;from multiverse.train.bpe import build_tokenizer;"
        "print(hashlib.sha256(build_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(digests) == 1


def test_default_is_cached(tok):
    assert default_tokenizer() is tok


def test_save_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert again.encode(MV_TEXT) == tok.encode(MV_TEXT)
    msgs = [{"role": "user", "content": "Q"}]
    assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(
        msgs, tokenize=False
    )
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_custom_corpus_and_errors():
    small = build_tokenizer(300, corpus=["hello world " * 20])
    assert len(small) <= 300
    assert small.decode(small.encode("hello <Path> world")) == "hello <Path> world"
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(100)
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer(512, corpus=[])
