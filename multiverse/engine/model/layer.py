"""One decoder layer: its parameters and everything it computes except attention.

Internal layout (invisible to callers, but the KV pool's contents depend on it):

- q/k/v projections are fused into one matrix (``qkv_weight``: q heads, then k heads, then v
  heads), gate/up into another (``gate_up_weight``: gate rows, then up rows).
- q/k rows are in the interleaved RoPE layout (see :mod:`.rope`); Qwen3's per-head q/k norm
  weights are stored once per head (``qk_norm [Hq + Hk, D]``), permuted alike.
- With ``CausalLM.quantize_`` the four projection matrices are :class:`.quant.QuantLinear`
  modules instead of parameters (weight-only int8 / int4, see :mod:`.quant`).
- Float32 on CPU, the forwards run the four matrices as :class:`.packed.PackedLinear` (which
  stores them transposed: same values and shape, strides ``(1, out)``); ``F.linear`` is the
  reference (``CausalLM.set_linear_kernel``).
- RMSNorm is ``F.rms_norm`` (one rounding); in bf16/fp16 logits therefore differ from
  transformers' (which rounds before the weight multiply) by rounding, not in fp32.

The forward loop reads a layer's tensors through :class:`LayerWeights` (plain attributes, no
``nn.Module`` lookups in the hot loop); ``CausalLM`` rebuilds them whenever parameters move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from multiverse.engine.model.quant import QuantLinear, add_linear, linear, low_rank
from multiverse.engine.model.rope import apply_rope_
from multiverse.engine.model.spec import ModelSpec

QUANTIZED = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")  # what quantize_ replaces


@dataclass(slots=True, frozen=True)
class LayerWeights:
    """One layer's tensors by name (H hidden, D head_dim, I intermediate; None = no such bias)."""

    input_norm: torch.Tensor  # [H]
    qkv_weight: torch.Tensor | QuantLinear  # [(Hq + 2 Hk) * D, H]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hk) * D]
    qk_norm: torch.Tensor | None  # [Hq + Hk, D] (Qwen3)
    o_weight: torch.Tensor | QuantLinear  # [H, Hq * D]
    o_bias: torch.Tensor | None  # [H]
    post_norm: torch.Tensor  # [H]
    gate_up_weight: torch.Tensor | QuantLinear  # [2 I, H]
    gate_up_bias: torch.Tensor | None  # [2 I]
    down_weight: torch.Tensor | QuantLinear  # [H, I]
    down_bias: torch.Tensor | None  # [H]


class DecoderLayer(nn.Module):
    """One decoder layer's parameters (fused projections, internal RoPE layout), uninitialised."""

    def __init__(self, spec: ModelSpec, factory: dict[str, Any]) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * d

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **factory), requires_grad=False)

        self.input_norm = param(h)
        self.qkv_weight = param(qkv_out, h)
        self.qkv_bias = param(qkv_out) if spec.qkv_bias else None
        self.qk_norm = param(spec.num_heads + spec.num_kv_heads, d) if spec.qk_norm else None
        self.o_weight = param(h, spec.num_heads * d)
        self.o_bias = param(h) if spec.o_bias else None
        self.post_norm = param(h)
        self.gate_up_weight = param(2 * spec.intermediate_size, h)
        self.gate_up_bias = param(2 * spec.intermediate_size) if spec.mlp_bias else None
        self.down_weight = param(h, spec.intermediate_size)
        self.down_bias = param(h) if spec.mlp_bias else None

    def quantize_(self, method: str, group_size: int, where: str,
                  base: dict[str, torch.Tensor] | None = None, rank: int = 0) -> None:  # fmt: skip
        """Replace the four projection matrices by :class:`QuantLinear` modules (in place).
        ``base``: the weights before a LoRA adapter was merged (rank <= ``rank``): the base is
        quantised and the adapter's delta kept beside it in float32 (:func:`.quant.low_rank`)."""
        for name in QUANTIZED:
            weight = getattr(self, name)
            if type(weight) is QuantLinear:
                raise ValueError(f"{where}.{name} is already quantised ({weight.method})")
            # contiguous: the float32 fast path may store a weight transposed (.packed)
            weight, lora = weight.contiguous(), None
            if base is not None:
                lora = low_rank(weight.float() - base[name], rank, f"{where}.{name}")
                weight = weight if lora is None else base[name].to(weight.dtype)
            q = QuantLinear(method, weight, group_size, name=f"{where}.{name}", lora=lora)
            delattr(self, name)
            setattr(self, name, q)

    def weights(self) -> LayerWeights:
        return LayerWeights(
            input_norm=self.input_norm,
            qkv_weight=self.qkv_weight,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            o_weight=self.o_weight,
            o_bias=self.o_bias,
            post_norm=self.post_norm,
            gate_up_weight=self.gate_up_weight,
            gate_up_bias=self.gate_up_bias,
            down_weight=self.down_weight,
            down_bias=self.down_bias,
        )


def attention_inputs(
    x: torch.Tensor, w: LayerWeights, spec: ModelSpec, rope: torch.Tensor
) -> torch.Tensor:
    """Input norm, fused q/k/v projection, (Qwen3) q/k norm, RoPE on q and k, in place.

    x ``[T, H]`` -> ``[T, (Hq + 2 Hk) * D]``: q heads, then k heads, then v heads.
    """
    d, nqk = spec.head_dim, spec.num_heads + spec.num_kv_heads
    h = F.rms_norm(x, (spec.hidden_size,), w.input_norm, spec.rms_norm_eps)
    qkv = linear(h, w.qkv_weight, w.qkv_bias)  # [T, (Hq + 2 Hk) * D]
    t = qkv.shape[0]
    qk = qkv[:, : nqk * d]  # [T, (Hq + Hk) * D] (view)
    if w.qk_norm is not None:  # Qwen3: RMSNorm over each q/k head's dims
        normed = F.rms_norm(qk.view(t, nqk, d), (d,), None, spec.rms_norm_eps) * w.qk_norm
        qk.copy_(normed.view(t, nqk * d))
    apply_rope_(qk, rope)
    return qkv


def finish_layer(
    x: torch.Tensor, attn: torch.Tensor, w: LayerWeights, spec: ModelSpec
) -> torch.Tensor:
    """Output projection + residual, post norm, SiLU MLP + residual: x, attn ``[T, ...]`` ->
    ``[T, H]``."""
    x = add_linear(x, attn, w.o_weight, w.o_bias)
    h = F.rms_norm(x, (spec.hidden_size,), w.post_norm, spec.rms_norm_eps)
    gate_up = linear(h, w.gate_up_weight, w.gate_up_bias)  # [T, 2 I]
    inter = spec.intermediate_size
    act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])  # [T, I]
    return add_linear(x, act, w.down_weight, w.down_bias)
