"""Hugging Face tensor names -> the engine's parameters.

Each HF tensor lands in one of ``CausalLM``'s parameters, possibly in a row range of a fused
matrix (q/k/v, gate/up; see :mod:`.layer`). q/k projection rows and q/k norm weights are
permuted per head into the interleaved RoPE layout on the way (kind ``"rope"`` /
``"rope_norm"``). ``model.loaded_hf_names`` records every name copied in, so a partial checkpoint is
caught by :func:`check_loaded` instead of leaving parameters uninitialised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from multiverse.engine.model.spec import ModelSpec

if TYPE_CHECKING:
    from multiverse.engine.model.causal_lm import CausalLM
    from multiverse.engine.model.layer import DecoderLayer


def hf_destination(model: CausalLM, name: str) -> tuple[torch.Tensor, slice | None, str]:
    """HF parameter name -> (our parameter, row slice, kind); ``KeyError`` for an unknown name."""
    s = model.spec
    if name == "model.embed_tokens.weight":
        return model.embed, None, "plain"
    if name == "model.norm.weight":
        return model.final_norm, None, "plain"
    if name == "lm_head.weight" and model.lm_head is not None:
        return model.lm_head, None, "plain"
    parts = name.split(".")
    if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers" or not parts[2].isdigit():
        raise KeyError(name)
    index = int(parts[2])
    if index >= s.num_layers:
        raise KeyError(name)
    layer: DecoderLayer = model.layers[index]  # type: ignore[assignment]
    rest = ".".join(parts[3:])
    d, hq, hk, inter = s.head_dim, s.num_heads, s.num_kv_heads, s.intermediate_size
    q_rows = slice(0, hq * d)
    k_rows = slice(hq * d, (hq + hk) * d)
    v_rows = slice((hq + hk) * d, (hq + 2 * hk) * d)
    table: dict[str, tuple[torch.Tensor | None, slice | None, str]] = {
        "input_layernorm.weight": (layer.input_norm, None, "plain"),
        "post_attention_layernorm.weight": (layer.post_norm, None, "plain"),
        "self_attn.q_proj.weight": (layer.qkv_weight, q_rows, "rope"),
        "self_attn.k_proj.weight": (layer.qkv_weight, k_rows, "rope"),
        "self_attn.v_proj.weight": (layer.qkv_weight, v_rows, "plain"),
        "self_attn.q_proj.bias": (layer.qkv_bias, q_rows, "rope"),
        "self_attn.k_proj.bias": (layer.qkv_bias, k_rows, "rope"),
        "self_attn.v_proj.bias": (layer.qkv_bias, v_rows, "plain"),
        "self_attn.o_proj.weight": (layer.o_weight, None, "plain"),
        "self_attn.o_proj.bias": (layer.o_bias, None, "plain"),
        "self_attn.q_norm.weight": (layer.qk_norm, slice(0, hq), "rope_norm"),
        "self_attn.k_norm.weight": (layer.qk_norm, slice(hq, hq + hk), "rope_norm"),
        "mlp.gate_proj.weight": (layer.gate_up_weight, slice(0, inter), "plain"),
        "mlp.up_proj.weight": (layer.gate_up_weight, slice(inter, 2 * inter), "plain"),
        "mlp.down_proj.weight": (layer.down_weight, None, "plain"),
        "mlp.gate_proj.bias": (layer.gate_up_bias, slice(0, inter), "plain"),
        "mlp.up_proj.bias": (layer.gate_up_bias, slice(inter, 2 * inter), "plain"),
        "mlp.down_proj.bias": (layer.down_bias, None, "plain"),
    }
    if rest not in table or table[rest][0] is None:
        raise KeyError(name)
    target, rows, kind = table[rest]
    assert target is not None
    return target, rows, kind


@torch.no_grad()
def load_hf_tensor(model: CausalLM, name: str, tensor: torch.Tensor) -> bool:
    """Copy one tensor of a Hugging Face state dict into place; False if the name is ignored.

    Raises ``KeyError`` for an unknown name and ``ValueError`` for a shape mismatch.
    """
    if name.endswith("rotary_emb.inv_freq"):
        return False
    if name == "lm_head.weight" and model.lm_head is None:
        return False  # tied embeddings: the checkpoint may carry a copy; the embedding wins
    target, rows, kind = hf_destination(model, name)
    dest = target if rows is None else target[rows]
    src = tensor
    if kind in ("rope", "rope_norm"):
        d = model.spec.head_dim
        if kind == "rope" and src.shape[0] % d == 0:
            heads = src.shape[0] // d
            src = src.reshape(heads, d, *src.shape[1:])[:, model.rope_perm].reshape(src.shape)
        elif kind == "rope_norm" and src.shape == (d,):
            src = src[model.rope_perm].expand(dest.shape[0], d)
    if tuple(src.shape) != tuple(dest.shape):
        raise ValueError(
            f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, but the "
            f"{model.spec.model_type} config expects {tuple(dest.shape)} (after fusion: "
            f"{tuple(src.shape)} into {tuple(dest.shape)})"
        )
    dest.copy_(src.to(device=dest.device, dtype=dest.dtype))
    model.loaded_hf_names.add(name)
    return True


def expected_hf_names(spec: ModelSpec) -> list[str]:
    """The HF tensor names a complete checkpoint provides for this architecture."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q", "k", "v"):
            names.append(f"{p}self_attn.{proj}_proj.weight")
            if spec.qkv_bias:
                names.append(f"{p}self_attn.{proj}_proj.bias")
        names.append(p + "self_attn.o_proj.weight")
        if spec.o_bias:
            names.append(p + "self_attn.o_proj.bias")
        if spec.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        for proj in ("gate", "up", "down"):
            names.append(f"{p}mlp.{proj}_proj.weight")
            if spec.mlp_bias:
                names.append(f"{p}mlp.{proj}_proj.bias")
    return names


def check_loaded(model: CausalLM, source: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming the tensors the checkpoint did not provide."""
    missing = [n for n in expected_hf_names(model.spec) if n not in model.loaded_hf_names]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        raise ValueError(f"{source} is missing weights: {shown}")


def load_hf_state_dict(
    model: CausalLM,
    state_dict: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    source: str = "state dict",
) -> None:
    """Load a whole HF-named state dict (a mapping, or ``(name, tensor)`` pairs read lazily);
    unknown names and missing weights raise ``ValueError``."""
    unknown = []
    items = state_dict.items() if isinstance(state_dict, dict) else state_dict
    for name, tensor in items:
        try:
            load_hf_tensor(model, name, tensor)
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"{source} has tensors the {model.spec.model_type} model does not use: "
            + ", ".join(unknown[:8])
            + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        )
    check_loaded(model, source)
