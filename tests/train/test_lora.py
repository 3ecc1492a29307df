"""``multiverse train --lora``: a PEFT adapter on a frozen base, the tag rows trainable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("peft")

from multiverse.eval import tasks  # noqa: E402
from multiverse.format import tokenizer as tokenizer_tags  # noqa: E402
from multiverse.train.bpe import default_tokenizer  # noqa: E402
from multiverse.train.data import ConfigError  # noqa: E402
from multiverse.train.trainer import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Qwen2 with the project tokenizer (tags already in the vocabulary)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = default_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=-(-len(tok) // 64) * 64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )
    out = tmp_path_factory.mktemp("base")
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    recs = tasks.generate(12, seed=1, tasks=["sum_products", "max_total"])
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs))
    return path


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _run(base_dir, data_file, out, **kw):
    cfg = TrainConfig(**{
        "data": str(data_file), "output": str(out), "model": str(base_dir), "lora": True, "lora_r": 4,
        "lora_alpha": 8, "lr": 5e-2, "batch_size": 4, "max_steps": 6, "warmup_ratio": 0.0,
        "save_steps": 1000, "progress": False, **kw,
    })  # fmt: skip
    return train(cfg, verbose=False)


def test_lora_trains_an_adapter_and_leaves_the_base_alone(base_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = {k: v.clone() for k, v in _state(base_dir / "model.safetensors").items()}
    result = _run(base_dir, data_file, tmp_path / "adapter")
    out = result.output
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert result.losses[-1] < result.losses[0]
    adapter = _state(out / "adapter_model.safetensors")
    # only LoRA matrices and the tag rows: no full embedding or base weight in the adapter
    assert adapter and all("lora_" in k or "trainable_tokens" in k for k in adapter), sorted(adapter)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["base_model"] == str(base_dir.resolve())
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir.resolve())
    assert 0 < summary["lora"]["trainable_parameters"] < summary["lora"]["parameters"]
    # the base on disk is untouched, and base + adapter differs from the base on the tags' rows
    after = _state(base_dir / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    tok = tokenizer_tags.load_tokenizer(out)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out
    ).merge_and_unload()
    tag_rows = sorted(tokenizer_tags.tag_ids(tok).values())
    emb0, emb1 = base.get_input_embeddings().weight, merged.get_input_embeddings().weight
    assert not torch.allclose(emb0[tag_rows], emb1[tag_rows])
    other = [i for i in range(emb0.shape[0]) if i not in set(tag_rows)]
    assert torch.equal(emb0[other], emb1[other])  # only the tag rows of the embedding train
    q0 = base.model.layers[0].self_attn.q_proj.weight
    q1 = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, q1)  # the LoRA delta is merged in


def test_merge_writes_a_full_model(base_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _run(base_dir, data_file, tmp_path / "merged", merge=True).output
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in k for k in model.state_dict())
    assert "base_model" not in json.loads((out / "train_summary.json").read_text())


def test_overwrite_replaces_the_earlier_model_whatever_its_kind(base_dir, data_file, tmp_path):
    """``--overwrite`` removes the earlier model's files: a full model's ``config.json`` left
    next to a new adapter would make the directory load as the old full model (the adapter
    ignored); an adapter left next to a merged model would be stale. Overwriting the base the
    adapter is trained for is refused."""
    from multiverse.engine.adapter import is_adapter_dir

    out = tmp_path / "out"
    shutil.copytree(base_dir, out)  # a full model
    assert (out / "config.json").is_file() and not is_adapter_dir(out)
    _run(base_dir, data_file, out, overwrite=True, max_steps=1)
    assert is_adapter_dir(out), sorted(p.name for p in out.iterdir())
    assert not (out / "model.safetensors").exists() and not (out / "generation_config.json").exists()
    _run(base_dir, data_file, out, merge=True, overwrite=True, max_steps=1)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match="base model's directory"):
        _run(base_dir, data_file, base_dir, overwrite=True)
    assert (base_dir / "config.json").is_file() and (base_dir / "model.safetensors").is_file()


def test_lora_options_are_checked(base_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match="--merge"):
        TrainConfig(data=str(data_file), output=str(tmp_path), model=str(base_dir), merge=True)
    with pytest.raises(ConfigError, match="--lora fine-tunes a pretrained model"):
        TrainConfig(data=str(data_file), output=str(tmp_path), config="qwen2-tiny", lora=True)
    with pytest.raises(ConfigError, match="lora-targets"):
        _run(base_dir, data_file, tmp_path / "x", lora_targets="no_such_proj")
