"""Rotary position embeddings in the engine's interleaved layout.

Hugging Face checkpoints rotate dims ``i`` and ``i + D/2`` of each query/key head together ("half
split"). At load time the engine permutes each q/k head's dims with :func:`interleave_perm` so
that dims ``2i`` and ``2i + 1`` rotate together; RoPE is then one complex multiply per head
(:func:`apply_rope_`). Attention scores are unchanged (q and k are permuted alike, v is not),
but the keys stored in the KV pool are in the permuted layout.

Positions are always caller-given (Multiverse positions: sibling paths restart at the same
position), never an implicit ``arange``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from multiverse.engine.model.spec import ModelSpec

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_settings(config: Any) -> tuple[str, float, dict[str, Any]]:
    """(rope_type, rope_theta, parameters) as transformers 5 reads them.

    transformers 5 keeps everything in ``config.rope_parameters`` (``rope_theta`` included);
    older configs have a top-level ``rope_theta`` and an optional ``rope_scaling`` dict.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported by the engine")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by the engine")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by the engine "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return rope_type, float(theta), params


def rope_inv_freq(spec: ModelSpec, config: Any) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim / 2]`` (float32) and the cos/sin scaling factor."""
    dim = spec.head_dim
    base = spec.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    p = spec.rope_params
    if spec.rope_type == "default":
        return inv_freq, 1.0
    if spec.rope_type == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if spec.rope_type == "llama3":
        factor = float(p["factor"])
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: many knobs; take transformers' own definition rather than a second copy of it.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](config)
    return inv_freq.float().cpu(), float(scaling)


def interleave_perm(head_dim: int) -> torch.Tensor:
    """``[head_dim]`` long: new dim ``2i`` <- old dim ``i``, new ``2i+1`` <- old ``i + D/2``."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).reshape(-1)


def rope_table(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> torch.Tensor:
    """The rotation of each token, for :func:`apply_rope_`.

    ``position_ids [T]`` -> complex ``[T, 1, D/2]`` for fp32/fp64 models, else real
    ``[2, T, 1, D/2]`` (cos, sin) in ``dtype``. Angles are computed in float32, like transformers.
    """
    freqs = position_ids.float()[:, None] * inv_freq  # [T, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    if dtype in (torch.float32, torch.float64):
        return torch.complex(cos.to(dtype), sin.to(dtype))[:, None, :]
    return torch.stack([cos, sin]).to(dtype)[:, :, None, :]


def apply_rope_(qk: torch.Tensor, rope: torch.Tensor) -> None:
    """Rotate ``qk [T, num_heads * D]`` (interleaved layout) in place by ``rope_table(...)``."""
    t = qk.shape[0]
    half = rope.shape[-1]  # D / 2
    heads = qk.shape[1] // (2 * half)
    if rope.is_complex():
        torch.view_as_complex(qk.view(t, heads, half, 2)).mul_(rope)
    else:
        pairs = qk.view(t, heads, half, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        cos, sin = rope[0], rope[1]
        rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
        pairs.copy_(rotated)
