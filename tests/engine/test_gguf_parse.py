"""A GGUF file is parsed once a load (:func:`multiverse.engine.adapter.gguf_parsed_once`).

transformers parses a GGUF for the config, again for the weights and again for the tokenizer
(4 s a parse for SmolLM2-135M's). Checked on a tiny llama GGUF written here (random float32
weights, a byte-level BPE tokenizer): the engine's loader parses it once, and what it loads is
what transformers loads on its own (config, weights, tokenizer); gguf-py is itself again after.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from multiverse.engine.adapter import causal_lm_from_hf, gguf_parsed_once, load_hf_model
from multiverse.engine.loader import load_model

gguf = pytest.importorskip("gguf")

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 2, 1, 32


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character for each of the 256 bytes."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path) -> None:
    """A llama GGUF with random float32 weights and a byte-level BPE tokenizer (3 merges)."""
    tokens = [*_byte_symbols(), "he", "ll", "hell", "<|im_start|>", "<|im_end|>"]
    vocab, head_dim = len(tokens), HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])  # the two chat tokens are control tokens
    w.add_token_merges(["h e", "l l", "he ll"])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    g = torch.Generator().manual_seed(0)

    def add(name: str, *shape: int) -> None:
        w.add_tensor(name, torch.randn(*shape, generator=g).numpy())

    add("token_embd.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        for name, shape in (("attn_norm", (HIDDEN,)), ("attn_q", (HIDDEN, HIDDEN)),
                            ("attn_k", (KV_HEADS * head_dim, HIDDEN)),
                            ("attn_v", (KV_HEADS * head_dim, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_norm", (HIDDEN,)),
                            ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)),
                            ("ffn_down", (HIDDEN, FFN))):  # fmt: skip
            add(f"blk.{i}.{name}.weight", *shape)
    add("output_norm.weight", HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The files gguf-py's reader parses from now on (its own constructor, counted)."""
    seen: list[str] = []
    parse = gguf.GGUFReader.__init__

    def counted(self, path, mode="r"):
        seen.append(os.path.realpath(path))
        parse(self, path, mode)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted)
    return seen


def _transformers_own(path: Path):
    """transformers alone on the file: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_the_loader_parses_the_file_once_where_transformers_parses_it_three_times(
    tiny_gguf, parses
):
    _transformers_own(tiny_gguf)
    assert parses == [os.path.realpath(tiny_gguf)] * 3  # config, weights, tokenizer
    parses.clear()
    load_model(tiny_gguf)
    assert parses == [os.path.realpath(tiny_gguf)]


def test_what_it_loads_is_what_transformers_loads(tiny_gguf):
    ref_model, ref_tok = _transformers_own(tiny_gguf)
    hf = load_hf_model(tiny_gguf)
    ref_config = ref_model.config.to_dict()
    del ref_config["quantization_config"]  # load_hf_model's model is float32, not GGUF-quantized
    assert hf.config.to_dict() == ref_config
    ref_state, state = ref_model.state_dict(), hf.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    model, tok, config = load_model(tiny_gguf)
    ours = causal_lm_from_hf(ref_model, "float32", "cpu", source="reference").state_dict()
    assert model.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())
    assert config.to_dict() == hf.config.to_dict()
    assert tok.get_vocab() == ref_tok.get_vocab() and len(tok.get_vocab()) > 256
    text = "<|im_start|>hello, hell<|im_end|>"
    assert tok.encode(text) == ref_tok.encode(text) and tok.eos_token == ref_tok.eos_token


def test_gguf_py_is_itself_again_after_the_scope(tiny_gguf, parses):
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError, match="inside"):
        with gguf_parsed_once():
            first = gguf.GGUFReader(tiny_gguf)
            with gguf_parsed_once():  # nested: the same parse
                assert gguf.GGUFReader(str(tiny_gguf)) is first
            assert gguf.GGUFReader(tiny_gguf) is first and isinstance(first, reader)
            arch = gguf.MODEL_ARCH.LLAMA
            assert gguf.get_tensor_name_map(arch, LAYERS) is gguf.get_tensor_name_map(arch, LAYERS)
            raise RuntimeError("an error inside")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert len(parses) == 1
    assert gguf.GGUFReader(tiny_gguf) is not first and len(parses) == 2


def test_the_parse_reads_the_mapping_as_a_plain_array(tiny_gguf):
    """The reader made in the scope slices the file through a plain ndarray view of its mapping
    (numpy's ``memmap`` indexing runs Python code: 2 s of SmolLM2's load), not a copy: the
    bytes are the file's, still mapped; its fields and tensors are the reader's own outside."""
    import numpy as np

    with gguf_parsed_once():
        plain = gguf.GGUFReader(tiny_gguf)
    own = gguf.GGUFReader(tiny_gguf)
    assert type(own.data) is np.memmap and type(plain.data) is np.ndarray
    assert isinstance(plain.data.base, np.memmap) and plain.data.tobytes() == tiny_gguf.read_bytes()
    assert list(plain.fields) == list(own.fields)
    for a, b in zip(plain.tensors, own.tensors, strict=True):
        assert a.name == b.name and np.array_equal(a.data, b.data)
        assert type(a.data) is np.ndarray and type(b.data) is np.memmap
