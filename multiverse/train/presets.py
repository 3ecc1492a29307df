"""Tiny from-scratch Qwen2 models for CPU work (``multiverse train --config NAME``).

The vocabulary is the tokenizer's (by default the project's own byte-level BPE, tags
included), rounded up to a multiple of 64 like the released checkpoint's embedding matrix.
Embeddings are tied. Parameter counts below are for the default 512-token vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 32768
    description: str = ""


PRESETS: dict[str, Preset] = {
    "qwen2-micro": Preset(64, 2, 4, 2, 128, description="~0.1M params, for tests and smoke runs"),
    "qwen2-mini": Preset(96, 6, 4, 2, 384, description="~0.9M params, learns a synthetic task in < 1 h on 2 CPU cores"),
    "qwen2-tiny": Preset(128, 6, 4, 2, 512, description="~1.5M params, memorises a task on CPU"),
    "qwen2-small": Preset(256, 10, 8, 4, 1024, description="~10M params"),
    "qwen2.5-0.5b-shape": Preset(896, 24, 14, 2, 4864, description="Qwen2.5-0.5B's layer shapes (GPU benchmarks)"),
}


def preset_config(name: str, tokenizer: Any, attn_implementation: str = "sdpa") -> Any:
    """A ``Qwen2Config`` for preset ``name`` sized to ``tokenizer``."""
    from transformers import Qwen2Config

    from multiverse.train.data import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    vocab = -(-len(tokenizer) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    return config


def build_model(
    name: str, tokenizer: Any, attn_implementation: str = "sdpa", seed: int | None = None
) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` for preset ``name`` (float32)."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = preset_config(name, tokenizer, attn_implementation)
    if seed is not None:
        torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)
