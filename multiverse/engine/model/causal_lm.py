"""The decoder-only LM the engine runs, and its three forwards.

- :meth:`CausalLM.forward` (one engine step over a :class:`KVPool`, the contract is in
  :mod:`.batch`): validates the batch, builds the step's attention metadata with a backend of
  :data:`ATTENTION_BACKENDS` (``"sdpa"``, or ``"reference"`` on request) and runs :meth:`step`.
- :meth:`CausalLM.step`: the step as a function of tensors (token ids, positions, slots, the
  pool buffer, the attention metadata -> logits), the same for every backend.
- :meth:`CausalLM.forward_full`: one sequence without any cache, reference attention; the
  "plain model over the whole sequence" the engine's outputs are checked against.

Per layer: input norm and fused q/k/v projection with RoPE (:func:`attention_inputs`), the new
K/V written to the pool, attention, then output projection and MLP (:func:`finish_layer`).
Inference only: parameters have ``requires_grad=False``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from multiverse.engine.model import cpu_fused, cpu_kernels, weights
from multiverse.engine.model.attention import (
    ATTENTION_BACKENDS,
    AttentionMetadata,
    causal_mask,
    reference_attention,
)
from multiverse.engine.model.batch import ForwardBatch
from multiverse.engine.model.kv_pool import KVPool
from multiverse.engine.model.layer import (
    QUANTIZED,
    DecoderLayer,
    LayerWeights,
    attention_inputs,
    finish_layer,
)
from multiverse.engine.model.packed import (
    LINEAR_KERNELS,
    onednn_available,
    pack,
    pack_weights,
    signature,
)
from multiverse.engine.model.quant import (
    DEFAULT_INT4_GROUP_SIZE,
    HEAD_QUANTIZATION,
    QuantLinear,
    check_quantization,
    linear,
)
from multiverse.engine.model.rope import interleave_perm, rope_inv_freq, rope_table
from multiverse.engine.model.spec import ModelSpec, resolve_dtype


class CausalLM(nn.Module):
    """A decoder-only LM (Qwen2/Qwen2.5, Llama, Qwen3) evaluated over a :class:`KVPool`.

    Build it with :func:`multiverse.engine.loader.load_model`, or ``CausalLM(config)`` followed by
    :meth:`load_hf_state_dict` (parameters start uninitialised). Inference only: parameters have
    ``requires_grad=False``; run under ``torch.inference_mode()``.
    """

    def __init__(
        self,
        config: Any,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.spec = spec = ModelSpec.from_config(config)
        self.num_layers = spec.num_layers
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.vocab_size = spec.vocab_size
        self.hidden_size = spec.hidden_size
        factory = {"dtype": resolve_dtype(dtype), "device": torch.device(device)}

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **factory), requires_grad=False)

        self.embed = param(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, factory) for _ in range(spec.num_layers))
        self.final_norm = param(spec.hidden_size)
        self.lm_head = (
            None if spec.tie_word_embeddings else param(spec.vocab_size, spec.hidden_size)
        )
        inv_freq, scaling = rope_inv_freq(spec, config)
        self.register_buffer("inv_freq", inv_freq.to(factory["device"]), persistent=False)
        self.rope_scaling = scaling
        self.rope_perm = interleave_perm(spec.head_dim)  # [D] long: HF dim of each of our dims
        self.loaded_hf_names: set[str] = set()
        self.quantization: str | None = None
        self.lm_head_q: QuantLinear | None = None  # the quantised LM head (quantize_)
        # a merged LoRA adapter's base weights per layer and its rank x 3 (the fused q/k/v), kept
        # by the loader when int4 follows: quantize_ keeps the delta beside the int4 base
        self.adapter_base: list[dict[str, torch.Tensor]] | None = None
        self.adapter_rank = 0
        self._layer_weights: list[LayerWeights] = []
        self.linear_kernel = "onednn"  # float32 on CPU; "torch" = F.linear (set_linear_kernel)
        self._packed: tuple[tuple, list[LayerWeights], Any] | None = None  # (signature, ...)
        self.fused_ops = True  # float32 CPU steps: the small ops in C (set_fused_ops)
        self._refresh_weight_cache()
        if factory["device"].type == "cpu":
            cpu_kernels.load()  # decode attention, int8: built once per machine (logged)
            cpu_fused.load()  # RMSNorm, RoPE + K/V write, SiLU * up (cpu_fused)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def lm_head_weight(self) -> torch.Tensor | QuantLinear:
        """The LM head: the embedding when tied, the quantised head after :meth:`quantize_`."""
        if self.lm_head_q is not None:
            return self.lm_head_q
        return self.embed if self.lm_head is None else self.lm_head

    def _refresh_weight_cache(self) -> None:
        # Plain attributes for the hot loop (nn.Module attribute lookups cost ~1 us each).
        self._layer_weights = [layer.weights() for layer in self.layers]
        self._packed = None

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy / pickle: the packed copy is not state (it is made again when needed)
        return {**self.__dict__, "_packed": None}

    def set_linear_kernel(self, kernel: str) -> CausalLM:
        """``"onednn"`` (default): float32 CPU matrices run :class:`.packed.PackedLinear` (one row:
        ``x @ W^T`` with the weight stored transposed; more rows: oneDNN with a packed copy;
        other dtypes and devices, and quantised matrices, run as before); ``"torch"``:
        ``F.linear`` everywhere, the reference. Setting it drops the packed copy."""
        if kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear kernel {kernel!r}: expected one of {LINEAR_KERNELS}")
        self.linear_kernel, self._packed = kernel, None
        return self

    def set_fused_ops(self, fused: bool) -> CausalLM:
        """``True`` (default): float32 CPU steps run their small ops (norms, RoPE and the K/V
        write, SiLU * up, residual adds) as :mod:`.cpu_fused` kernels where they can run;
        ``False``: torch's ops, the reference."""
        self.fused_ops = bool(fused)
        return self

    def _weights(self) -> tuple[list[LayerWeights], Any]:
        """The layers' weights and the LM head the forwards run: packed for ``"onednn"``,
        packed again when a weight was replaced or written in place since."""
        if self.linear_kernel == "torch" or not onednn_available(self.dtype, self.device):
            return self._layer_weights, self.lm_head_weight
        head = self.lm_head_weight
        mats = [head, *(getattr(w, n) for w in self._layer_weights for n in QUANTIZED)]
        if self._packed is None or self._packed[0] != signature(mats):
            layers = [pack_weights(w, QUANTIZED) for w in self._layer_weights]
            # the tied embedding keeps its row-major storage (the embedding lookup reads rows)
            packed_head = pack(head, transpose_storage=head is not self.embed)
            self._packed = (signature(mats), layers, packed_head)  # after store_transposed_
        return self._packed[1], self._packed[2]

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        out = super()._apply(fn, recurse)
        self._refresh_weight_cache()
        return out

    @torch.no_grad()
    def quantize_(self, method: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> CausalLM:
        """Weight-only ``"int8"`` / ``"int4"`` (``group_size`` input columns a scale) for every
        projection matrix, in place, after loading (:mod:`.quant`); the LM head is int8 in both
        (int4 there costs most of the accuracy: :data:`.quant.HEAD_QUANTIZATION`); the embedding
        table, norms and biases keep the model's dtype. CPU only; irreversible. With
        ``adapter_base`` (a LoRA adapter loaded for int4) int4 quantises the base weights and keeps
        the adapter's delta beside them in float32: requantising the merged weights to 4 bits
        keeps ~7% of that delta on SmolLM2 (the base's Q4_1 grid snaps back), int8 all of it."""
        check_quantization(method, self.device, group_size)
        if self.quantization is not None:
            raise ValueError(f"the model is already quantised ({self.quantization})")
        base = self.adapter_base if method == "int4" else None  # int8 keeps a merged delta whole
        for i, layer in enumerate(self.layers):
            layer.quantize_(method, group_size, f"layers.{i}", None if base is None else base[i],
                            self.adapter_rank)  # type: ignore[operator]  # fmt: skip
        self.adapter_base = None
        head = HEAD_QUANTIZATION[method]
        weight = self.lm_head_weight.contiguous()  # type: ignore[union-attr]  (store_transposed_)
        self.lm_head_q = QuantLinear(head, weight, group_size, name="lm_head")
        if self.lm_head is not None:
            self.lm_head = None  # untied: the quantised copy replaces it
        self.quantization = method
        self._refresh_weight_cache()
        return self

    @torch.no_grad()
    def dequantized(self) -> CausalLM:
        """The reference of a quantised model: a float32 copy whose matrices are the dequantised
        weights (:meth:`.quant.QuantLinear.dequantize`), run by plain ``F.linear``."""
        if self.quantization is None:
            raise ValueError("dequantized() needs a quantised model (quantize_ first)")
        ref = copy.deepcopy(self)
        for layer in ref.layers:
            for name in QUANTIZED:
                weight = getattr(layer, name).dequantize().to(self.dtype)
                delattr(layer, name)
                setattr(layer, name, nn.Parameter(weight, requires_grad=False))
        assert ref.lm_head_q is not None
        ref.lm_head = nn.Parameter(ref.lm_head_q.dequantize().to(self.dtype), requires_grad=False)
        ref.lm_head_q, ref.quantization = None, None
        ref._refresh_weight_cache()
        return ref

    # ---------------------------------------------------------------- loading HF weights

    def load_hf_tensor(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one HF tensor into place (see :func:`.weights.load_hf_tensor`)."""
        return weights.load_hf_tensor(self, name, tensor)

    def expected_hf_names(self) -> list[str]:
        """The HF tensor names a complete checkpoint provides for this config."""
        return weights.expected_hf_names(self.spec)

    def check_loaded(self, source: str = "checkpoint") -> None:
        """Raise ``ValueError`` naming the tensors the checkpoint did not provide."""
        weights.check_loaded(self, source)

    def load_hf_state_dict(
        self,
        state_dict: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        source: str = "state dict",
    ) -> None:
        """Load a whole HF-named state dict (a mapping, or ``(name, tensor)`` pairs read lazily);
        unknown names and missing weights raise ``ValueError``."""
        weights.load_hf_state_dict(self, state_dict, source)

    # ---------------------------------------------------------------- forwards

    def _logits(self, x: torch.Tensor, head: Any) -> torch.Tensor:
        """Final norm and LM head: x ``[R, H]`` -> float32 logits ``[R, vocab]``."""
        h = F.rms_norm(x, (self.spec.hidden_size,), self.final_norm, self.spec.rms_norm_eps)
        return linear(h, head, None).float()

    def forward(self, batch: ForwardBatch, kv: KVPool, *, reference: bool = False) -> torch.Tensor:  # type: ignore[override]
        """One engine step: write the new tokens' K/V into ``kv``, return float32 logits
        ``[len(logits_rows), vocab]`` (default rows: the last new token of each sequence).

        ``reference=True`` runs the reference attention backend instead of the fast one.
        """
        if kv.num_layers != self.num_layers or kv.kv.shape[3:] != (
            self.num_kv_heads,
            self.head_dim,
        ):
            raise ValueError(
                f"{kv!r} does not fit this model ({self.num_layers} layers, "
                f"{self.num_kv_heads} kv heads, head_dim {self.head_dim})"
            )
        plan = ATTENTION_BACKENDS["reference" if reference else "sdpa"](batch)
        rows = batch.logits_rows
        if rows is None and max(batch.q_lens) != 1:
            ends, total = [], -1
            for q in batch.q_lens:
                total += q
                ends.append(total)
            rows = torch.tensor(ends, dtype=torch.long, device=batch.input_ids.device)
        return self.step(batch.input_ids, batch.position_ids, batch.slot_mapping, kv.kv, plan, rows)

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_buffer: torch.Tensor,
        plan: AttentionMetadata,
        logits_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """The step as a function of tensors: ``input_ids`` / ``position_ids`` / ``slot_mapping``
        ``[T]``, ``kv_buffer`` is ``KVPool.kv`` (updated in place), ``plan`` a backend's
        metadata for this batch; returns float32 logits for ``logits_rows`` (None: every row)."""
        s = self.spec
        d, hq, hk = s.head_dim, s.num_heads, s.num_kv_heads
        x = F.embedding(input_ids, self.embed)  # [T, H]
        t = x.shape[0]
        rope = rope_table(position_ids, self.inv_freq, self.rope_scaling, self.dtype)
        layer_weights, head = self._weights()
        fused = cpu_fused.usable(self, kv_buffer)
        if fused is not None:
            x = cpu_fused.run_layers(fused, x, layer_weights, s, rope, slot_mapping, kv_buffer, plan)
        for layer, w in enumerate(layer_weights if fused is None else ()):
            qkv = attention_inputs(x, w, s, rope)  # [T, (Hq + 2 Hk) * D]
            new_kv = qkv[:, hq * d :].view(t, 2, hk, d)  # [T, 2, Hk, D]
            pool = kv_buffer[layer]  # [S, 2, Hk, D]
            pool.index_copy_(0, slot_mapping, new_kv)
            attn = plan.attend(qkv[:, : hq * d], new_kv, pool)  # [T, Hq * D]
            x = finish_layer(x, attn, w, s)
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        return self._logits(x, head)

    def forward_full(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reference forward of ONE sequence without any cache: logits ``[n, vocab]`` float32.

        ``position_ids`` default to ``arange(n)``; ``mask`` is Bool ``[n, n]`` (True = may
        attend), default causal. This is the "plain model over the whole sequence" that the
        engine's outputs are checked against (SPEC section 3).
        """
        if input_ids.dim() != 1:
            raise ValueError(
                f"forward_full takes one sequence: input_ids [n], got {tuple(input_ids.shape)}"
            )
        n = input_ids.shape[0]
        device = self.device
        input_ids = input_ids.to(device)
        position_ids = (
            torch.arange(n, device=device) if position_ids is None else position_ids.to(device)
        )
        if position_ids.shape != (n,):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected ({n},)")
        mask = (
            causal_mask(n, n, device) if mask is None else mask.to(device=device, dtype=torch.bool)
        )
        if mask.shape != (n, n):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({n}, {n})")
        s = self.spec
        d, hq, hk = s.head_dim, s.num_heads, s.num_kv_heads
        x = F.embedding(input_ids, self.embed)  # [n, H]
        rope = rope_table(position_ids, self.inv_freq, self.rope_scaling, self.dtype)
        layer_weights, head = self._weights()
        for w in layer_weights:
            qkv = attention_inputs(x, w, s, rope)  # [n, (Hq + 2 Hk) * D]
            q = qkv[:, : hq * d].view(n, hq, d)
            k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
            v = qkv[:, (hq + hk) * d :].view(n, hk, d)
            x = finish_layer(x, reference_attention(q, k, v, mask), w, s)
        return self._logits(x, head)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{s.model_type}: layers={s.num_layers}, hidden={s.hidden_size}, heads={s.num_heads}, "
            f"kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, vocab={s.vocab_size}, "
            f"dtype={self.dtype}" + (f", quantization={self.quantization}" if self.quantization else "")
        )
