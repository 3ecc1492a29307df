"""The engine's tensor side: our own forward pass for Qwen2/Qwen2.5, Llama and Qwen3 checkpoints.

Interface additions (all optional, the agreed interface is unchanged): ``forward(batch, kv,
reference=False)``; ``forward_full``'s ``position_ids`` / ``mask`` default to arange / causal;
``KVPool.kv`` (the one buffer behind ``k`` / ``v``), ``KVPool.for_model(model, num_slots)``;
``CausalLM.step(...)`` (the fast step as a function of tensors), ``CausalLM.load_hf_state_dict``.

The engine never runs a transformers model. It runs :class:`CausalLM`, a small re-implementation
of the decoder (RMSNorm, RoPE with caller-given position ids, GQA attention, SiLU MLP) that reads
the K/V of every sequence out of one preallocated token-granular :class:`KVPool`.

Contract of :meth:`CausalLM.forward` (one engine step):

- ``batch.input_ids[T]`` are the new tokens of all sequences concatenated, ``batch.q_lens`` says
  how many belong to each sequence, ``batch.position_ids[T]`` their positions (Multiverse
  positions: sibling paths restart at the same position, so never assume ``arange``).
- The K/V of the new tokens are written to ``batch.slot_mapping[T]`` of the pool *before*
  attention; ``batch.kv_indices[i]`` lists the pool slots of ALL keys sequence ``i`` attends, in
  order, and its last ``q_lens[i]`` entries are that sequence's new tokens. The K/V list is the
  whole visibility story for a branch: the engine hands a branch only the shared prefix plus its
  own tokens, so plain causal attention over that list is Multiverse Attention.
- ``batch.masks[i]`` (Bool ``[q_len, kv_len]``, True = may attend) overrides the causal rule for
  one sequence; ``None`` means causal: new token ``j`` sees ``kv[: kv_len - q_len + j + 1]``.
- Returns float32 logits for ``batch.logits_rows`` (default: the last new token of each sequence).

Attention has two implementations with a parity test between them (``tests/test_models.py``):

- the *fast* path: one gather of every sequence's K/V into a padded ``[B, max_kv]`` batch and one
  ``scaled_dot_product_attention`` call per layer with a small Bool mask (key padding for decode;
  ``[B, 1, max_q, max_kv]`` for prefill chunks and custom masks). A single fresh sequence
  (prefill, no cached prefix) attends its own new K/V with ``is_causal`` and reads nothing back.
  On CUDA a decode step folds each KV head's G query heads into G query rows (no GQA support
  needed next to a mask). Never a dense float ``[L, L]`` mask.
- the *reference* path (``forward(..., reference=True)`` and :meth:`CausalLM.forward_full`): per
  sequence, explicit fp32 softmax(QK^T) V with a Bool mask, GQA by repeating K/V heads.

Internal layout (invisible to callers, but the pool's contents depend on it):

- q/k/v projections are fused into one matrix, gate/up into another.
- Each query/key head's dimensions are permuted at load time from the Hugging Face "half split"
  RoPE layout (dims ``i`` and ``i + D/2`` rotate together) to the interleaved layout (dims ``2i``
  and ``2i+1``), so RoPE is one complex multiply. Attention scores are unchanged (q and k are
  permuted alike; v is not permuted); keys stored in :class:`KVPool` are in the permuted layout.
- RMSNorm is ``F.rms_norm`` (one rounding); in bf16/fp16 logits therefore differ from
  transformers' (which rounds before the weight multiply) by rounding, not in fp32.
- :class:`KVPool` stores K and V interleaved in one buffer ``kv[layer, slot, 2, kv_head, dim]``;
  ``KVPool.k`` / ``KVPool.v`` are (non-contiguous) views of it, so one index_copy writes both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "ForwardBatch",
    "KVPool",
    "ModelSpec",
    "resolve_dtype",
]

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bf16"`` / ``torch.float16`` ... -> a torch floating dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


# --------------------------------------------------------------------------- batch and KV pool


@dataclass(slots=True)
class ForwardBatch:
    """The tensors of one engine step (see the module docstring for the contract)."""

    input_ids: torch.Tensor  # [T] long
    position_ids: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long, pool slot of each new token
    q_lens: list[int]  # new tokens per sequence, sum == T
    kv_indices: list[torch.Tensor]  # per sequence [kv_len] long; last q_len entries = new tokens
    masks: list[torch.Tensor | None]  # per sequence Bool [q_len, kv_len] or None (= causal)
    logits_rows: torch.Tensor | None = (
        None  # [R] long rows of T; None = last token of each sequence
    )
    groups: list[tuple[torch.Tensor, list[int]]] | None = None
    """Decode steps only (every ``q_len == 1``, no masks): sequences sharing a K/V prefix, as
    ``(prefix slots, member sequence indices)``; every sequence in exactly one group and every
    member's ``kv_indices`` starting with the group's prefix. The fast path then reads a shared
    prefix once per group ("cascade" attention); the reference path ignores it."""


class KVPool:
    """Preallocated key/value storage at token granularity, shared by all sequences.

    ``kv[layer, slot, 0]`` is the key and ``kv[layer, slot, 1]`` the value of the token stored in
    ``slot`` (shape ``[num_kv_heads, head_dim]``, keys in the model's internal RoPE layout). The
    pool is zero-initialised, so a padded gather of an unused slot reads finite numbers. Which
    slots are in use is the engine's bookkeeping, not the pool's.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if min(num_layers, num_slots, num_kv_heads, head_dim) <= 0:
            raise ValueError(
                f"KVPool sizes must be positive, got num_layers={num_layers}, "
                f"num_slots={num_slots}, num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        # [num_layers, num_slots, 2, num_kv_heads, head_dim]
        self.kv = torch.zeros(
            num_layers, num_slots, 2, num_kv_heads, head_dim, dtype=self.dtype, device=self.device
        )
        self.k = self.kv[:, :, 0]  # [num_layers, num_slots, num_kv_heads, head_dim] (view)
        self.v = self.kv[:, :, 1]

    @classmethod
    def for_model(cls, model: CausalLM, num_slots: int) -> KVPool:
        """A pool shaped, typed and placed for ``model``."""
        return cls(
            model.num_layers,
            num_slots,
            model.num_kv_heads,
            model.head_dim,
            dtype=model.dtype,
            device=model.device,
        )

    @staticmethod
    def bytes_per_slot(config: Any, dtype: str | torch.dtype) -> int:
        """Bytes one token's K and V take over all layers of a model with this HF config."""
        spec = ModelSpec.from_config(config)
        itemsize = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
        return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * itemsize

    def __repr__(self) -> str:
        return (
            f"KVPool(num_layers={self.num_layers}, num_slots={self.num_slots}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
            f"device={self.device})"
        )


# --------------------------------------------------------------------------- architecture spec


@dataclass(slots=True)
class ModelSpec:
    """What the forward pass needs to know about an HF config, validated once."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    rope_type: str
    rope_theta: float
    rope_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in the model config; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(
                f"unsupported hidden_act {act!r} in the {model_type} config (only silu)"
            )
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise ValueError(
                f"{model_type} config has use_sliding_window=True; sliding-window attention is "
                "not supported by the engine"
            )
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        rope_type, rope_theta, rope_params = _rope_settings(config)
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(config.rms_norm_eps),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope_type=rope_type,
            rope_theta=rope_theta,
            rope_params=rope_params,
        )


def _rope_settings(config: Any) -> tuple[str, float, dict[str, Any]]:
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
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by the engine "
            "(supported: default, linear, llama3, yarn)"
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


def _interleave_perm(head_dim: int) -> torch.Tensor:
    """New dim ``2i`` <- old dim ``i``, new ``2i+1`` <- old ``i + D/2`` (half split -> pairs)."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).reshape(-1)


# --------------------------------------------------------------------------- attention plans


@dataclass(slots=True)
class CascadePlan:
    """Shared-prefix decode attention: each of G groups attends as ONE sequence whose keys are
    its prefix followed by its members' own suffixes (``union``, padded to U slots) and whose
    M query rows are its members; a member's row sees the prefix and its own suffix only."""

    groups: int
    members: int
    union_len: int
    gather: torch.Tensor  # [G * U] long (padding: slot 0, masked)
    mask: torch.Tensor  # Bool [G, 1, M, U]
    member_rows: torch.Tensor  # [G * M] long: sequence of each (group, member), padding -> 0
    seq_slot: torch.Tensor  # [N] long: flat (group, member) index of each sequence


def build_cascade_plan(batch: ForwardBatch) -> CascadePlan:
    """Validate ``batch.groups`` (see :class:`ForwardBatch`) and build the cascade tensors."""
    groups = batch.groups or []
    n = len(batch.q_lens)
    if any(q != 1 for q in batch.q_lens) or any(m is not None for m in batch.masks):
        raise ValueError("ForwardBatch.groups is for decode steps only (q_len 1, no masks)")
    owner = [-1] * n
    device = batch.input_ids.device
    for g, (prefix, members) in enumerate(groups):
        if not members:
            raise ValueError(f"group {g} has no members")
        for i in members:
            if not 0 <= i < n or owner[i] != -1:
                raise ValueError(f"group {g}: sequence {i} is out of range or in two groups")
            owner[i] = g
            if batch.kv_indices[i].shape[0] <= prefix.shape[0]:
                raise ValueError(f"group {g}: sequence {i} has no K/V after the shared prefix")
            if not torch.equal(batch.kv_indices[i][: prefix.shape[0]], prefix.to(device)):
                raise ValueError(f"group {g}: sequence {i} does not start with the group's prefix")
    if -1 in owner:
        raise ValueError(f"sequence {owner.index(-1)} is in no group")
    num_groups = len(groups)
    max_m = max(len(m) for _, m in groups)
    unions, starts, ends, plens = [], [], [], []
    member_rows = torch.zeros(num_groups, max_m, dtype=torch.long)
    slot = [0] * n
    for g, (prefix, members) in enumerate(groups):
        p = int(prefix.shape[0])
        parts, at, st, en = [prefix.to(device)], p, [], []
        for m, i in enumerate(members):
            own = batch.kv_indices[i][p:]
            parts.append(own)
            st.append(at)
            en.append(at + int(own.shape[0]))
            at += int(own.shape[0])
            slot[i] = g * max_m + m
        pad = max_m - len(members)
        starts.append(st + [0] * pad)  # padding rows see key 0 only (a harmless non-empty row)
        ends.append(en + [1] * pad)
        plens.append(p)
        unions.append(torch.cat(parts))
        member_rows[g, : len(members)] = torch.tensor(members, dtype=torch.long)
    gather = torch.nn.utils.rnn.pad_sequence(unions, batch_first=True)  # [G, U]
    u = gather.shape[1]
    keys = torch.arange(u, device=device)[None, None, :]
    lo = torch.tensor(starts, dtype=torch.long, device=device)[:, :, None]
    hi = torch.tensor(ends, dtype=torch.long, device=device)[:, :, None]
    plen = torch.tensor(plens, dtype=torch.long, device=device)[:, None, None]
    mask = (keys < plen) | ((keys >= lo) & (keys < hi))  # [G, M, U]
    return CascadePlan(
        groups=num_groups,
        members=max_m,
        union_len=u,
        gather=gather.reshape(-1),
        mask=mask[:, None],
        member_rows=member_rows.reshape(-1).to(device),
        seq_slot=torch.tensor(slot, dtype=torch.long, device=device),
    )


def cascade_attention(
    q: torch.Tensor, pool: torch.Tensor, plan: CascadePlan, num_kv_heads: int
) -> torch.Tensor:
    """Decode attention with shared prefixes: q ``[N, Hq * D]``, pool ``[S, 2, Hk, D]`` ->
    ``[N, Hq * D]``. A group's prefix K/V is read once for all its members (one SDPA call per
    step and layer over the groups)."""
    hk, d = num_kv_heads, pool.shape[-1]
    hq = q.shape[1] // d
    g, m, u = plan.groups, plan.members, plan.union_len
    kv = pool.index_select(0, plan.gather).view(g, u, 2, hk, d)
    k = kv[:, :, 0].transpose(1, 2)  # [G, Hk, U, D]
    v = kv[:, :, 1].transpose(1, 2)
    qg = q.index_select(0, plan.member_rows).view(g, m, hq, d).transpose(1, 2)  # [G, Hq, M, D]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(g * m, hq * d).index_select(0, plan.seq_slot)


@dataclass(slots=True)
class AttentionPlan:
    """Index and mask tensors for the fast attention path, built once per step, shared by layers.

    ``fresh_causal``: a single sequence with no cached prefix and no custom mask; attention runs
    on the new K/V directly with ``is_causal``. Otherwise K/V are gathered from the pool with
    ``gather`` (``[B * max_kv]`` slots, padded rows point at a valid slot and are masked out),
    queries are regrouped with ``q_index`` (``[B * max_q]`` rows of T, None when every sequence
    has ``max_q`` new tokens) and scattered back with ``out_index`` (``[T]``).
    """

    num_seqs: int
    max_q: int
    max_kv: int
    fresh_causal: bool = False
    gather: torch.Tensor | None = None  # [B * max_kv] long
    q_index: torch.Tensor | None = None  # [B * max_q] long
    out_index: torch.Tensor | None = None  # [T] long
    attn_mask: torch.Tensor | None = None  # Bool [B, 1, max_q, max_kv]
    fold_gqa: bool = False  # decode only: the G query heads of a KV head become G query rows
    cascade: CascadePlan | None = None  # decode with shared prefixes (ForwardBatch.groups)


def build_attention_plan(batch: ForwardBatch, fold_gqa: bool | None = None) -> AttentionPlan:
    """Validate a batch's per-sequence lists and build the fast path's tensors (no device sync).

    ``fold_gqa`` (default: on CUDA) lets a decode step (every ``q_len == 1``) attend with queries
    ``[B, Hk, G, D]`` against un-repeated K/V, so SDPA needs no GQA support next to a mask
    (CUDA's fused kernels with a mask lack it); on CPU ``enable_gqa`` is faster.
    """
    q_lens = batch.q_lens
    num_seqs = len(q_lens)
    if num_seqs == 0:
        raise ValueError("ForwardBatch has no sequences (q_lens is empty)")
    if len(batch.kv_indices) != num_seqs or len(batch.masks) != num_seqs:
        raise ValueError(
            f"ForwardBatch lists disagree: {num_seqs} q_lens, {len(batch.kv_indices)} kv_indices, "
            f"{len(batch.masks)} masks"
        )
    total = batch.input_ids.shape[0]
    if sum(q_lens) != total:
        raise ValueError(f"sum(q_lens)={sum(q_lens)} but input_ids has {total} tokens")
    if batch.position_ids.shape[0] != total or batch.slot_mapping.shape[0] != total:
        raise ValueError(
            f"input_ids has {total} tokens but position_ids has {batch.position_ids.shape[0]} "
            f"and slot_mapping {batch.slot_mapping.shape[0]}"
        )
    kv_lens = [int(ix.shape[0]) for ix in batch.kv_indices]
    for i, (q, kv, m) in enumerate(zip(q_lens, kv_lens, batch.masks, strict=True)):
        if q <= 0 or kv < q:
            raise ValueError(f"sequence {i}: q_len={q} must be >= 1 and <= kv_len={kv}")
        if m is not None and tuple(m.shape) != (q, kv):
            raise ValueError(f"sequence {i}: mask has shape {tuple(m.shape)}, expected {(q, kv)}")
    max_q, max_kv = max(q_lens), max(kv_lens)
    device = batch.input_ids.device
    has_masks = any(m is not None for m in batch.masks)
    if batch.groups is not None:
        return AttentionPlan(num_seqs, max_q, max_kv, cascade=build_cascade_plan(batch))

    if num_seqs == 1 and kv_lens[0] == q_lens[0] and not has_masks:
        return AttentionPlan(1, max_q, max_kv, fresh_causal=True)

    if all(kv == max_kv for kv in kv_lens):
        gather = torch.cat(batch.kv_indices) if num_seqs > 1 else batch.kv_indices[0]
    else:
        gather = torch.nn.utils.rnn.pad_sequence(batch.kv_indices, batch_first=True).reshape(-1)

    q_index = out_index = None
    if any(q != max_q for q in q_lens):
        starts = [0] * num_seqs
        for i in range(1, num_seqs):
            starts[i] = starts[i - 1] + q_lens[i - 1]
        rows, back = [], []
        for i, (s, q) in enumerate(zip(starts, q_lens, strict=True)):
            rows.extend(range(s, s + q))
            rows.extend([s] * (max_q - q))  # padding rows: any valid row, dropped afterwards
            back.extend(range(i * max_q, i * max_q + q))
        q_index = torch.tensor(rows, dtype=torch.long, device=device)
        out_index = torch.tensor(back, dtype=torch.long, device=device)

    attn_mask = None
    all_decode = max_q == 1
    if has_masks or not all_decode or any(kv != max_kv for kv in kv_lens):
        kv_t = torch.tensor(kv_lens, dtype=torch.long, device=device)[:, None, None]
        q_t = torch.tensor(q_lens, dtype=torch.long, device=device)[:, None, None]
        qi = torch.arange(max_q, device=device)[None, :, None]
        kj = torch.arange(max_kv, device=device)[None, None, :]
        # causal: query j of a sequence sees key k iff k <= kv_len - q_len + j; padding query
        # rows (j >= q_len) get a harmless non-empty row and are dropped afterwards.
        attn_mask = (kj <= qi + (kv_t - q_t)) & (kj < kv_t)  # [B, max_q, max_kv]
        if has_masks:
            for i, m in enumerate(batch.masks):
                if m is not None:
                    attn_mask[i, : q_lens[i], : kv_lens[i]] = m.to(device=device, dtype=torch.bool)
        attn_mask = attn_mask[:, None]
    if fold_gqa is None:
        fold_gqa = device.type == "cuda"
    fold_gqa = fold_gqa and max_q == 1
    return AttentionPlan(
        num_seqs, max_q, max_kv, False, gather, q_index, out_index, attn_mask, fold_gqa
    )


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    max_score_bytes: int = 1 << 28,
) -> torch.Tensor:
    """Plain attention for one sequence: fp32 softmax, GQA by repeating K/V heads.

    q ``[n, Hq, D]``, k/v ``[m, Hk, D]``, mask Bool ``[n, m]`` -> ``[n, Hq * D]``. Queries are
    processed in row chunks so the fp32 score tensor stays under ``max_score_bytes``.
    """
    n, num_heads, head_dim = q.shape
    m = k.shape[0]
    rep = num_heads // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()  # [m, Hq, D]
    v = v.repeat_interleave(rep, dim=1).float()
    rows = max(1, max_score_bytes // (4 * num_heads * max(m, 1)))
    out = torch.empty(n, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        scores = torch.einsum("nhd,mhd->hnm", q[lo:hi].float(), k) * head_dim**-0.5
        scores = scores.masked_fill(~mask[None, lo:hi], float("-inf"))
        out[lo:hi] = torch.einsum("hnm,mhd->nhd", torch.softmax(scores, dim=-1), v)
    return out.reshape(n, num_heads * head_dim).to(q.dtype)


def causal_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[q_len, kv_len]``: query j sees keys ``[: kv_len - q_len + j + 1]``."""
    qi = torch.arange(q_len, device=device)[:, None]
    kj = torch.arange(kv_len, device=device)[None, :]
    return kj <= qi + (kv_len - q_len)


# --------------------------------------------------------------------------- the model


class _Layer(nn.Module):
    """One decoder layer's parameters (fused projections, internal RoPE layout)."""

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

    def weights(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.input_norm,
            self.qkv_weight,
            self.qkv_bias,
            self.qk_norm,
            self.o_weight,
            self.o_bias,
            self.post_norm,
            self.gate_up_weight,
            self.gate_up_bias,
            self.down_weight,
            self.down_bias,
        )


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
        self.embed = nn.Parameter(
            torch.empty(spec.vocab_size, spec.hidden_size, **factory), requires_grad=False
        )
        self.layers = nn.ModuleList(_Layer(spec, factory) for _ in range(spec.num_layers))
        self.final_norm = nn.Parameter(
            torch.empty(spec.hidden_size, **factory), requires_grad=False
        )
        self.lm_head = (
            None
            if spec.tie_word_embeddings
            else nn.Parameter(
                torch.empty(spec.vocab_size, spec.hidden_size, **factory), requires_grad=False
            )
        )
        inv_freq, scaling = rope_inv_freq(spec, config)
        self.register_buffer("inv_freq", inv_freq.to(factory["device"]), persistent=False)
        self.rope_scaling = scaling
        self._perm = _interleave_perm(spec.head_dim)
        self._loaded: set[str] = set()
        self._layer_weights: list[tuple[torch.Tensor | None, ...]] = []
        self._refresh_weight_cache()

    # ---------------------------------------------------------------- properties / plumbing

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def _refresh_weight_cache(self) -> None:
        # Plain tuples of tensors for the hot loop (nn.Module attribute lookups cost ~1 us each).
        self._layer_weights = [layer.weights() for layer in self.layers]

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        out = super()._apply(fn, recurse)
        self._refresh_weight_cache()
        return out

    # ---------------------------------------------------------------- loading HF weights

    def _slot_for(self, name: str) -> tuple[torch.Tensor, slice | None, str]:
        """HF parameter name -> (our parameter, row slice, kind)."""
        s = self.spec
        if name == "model.embed_tokens.weight":
            return self.embed, None, "plain"
        if name == "model.norm.weight":
            return self.final_norm, None, "plain"
        if name == "lm_head.weight" and self.lm_head is not None:
            return self.lm_head, None, "plain"
        parts = name.split(".")
        if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers" or not parts[2].isdigit():
            raise KeyError(name)
        index = int(parts[2])
        if index >= s.num_layers:
            raise KeyError(name)
        layer: _Layer = self.layers[index]  # type: ignore[assignment]
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
    def load_hf_tensor(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one tensor of a Hugging Face state dict into place; False if the name is ignored.

        Raises ``KeyError`` for an unknown name and ``ValueError`` for a shape mismatch.
        """
        if name.endswith("rotary_emb.inv_freq"):
            return False
        if name == "lm_head.weight" and self.lm_head is None:
            return False  # tied embeddings: the checkpoint may carry a copy; the embedding wins
        target, rows, kind = self._slot_for(name)
        dest = target if rows is None else target[rows]
        src = tensor
        if kind in ("rope", "rope_norm"):
            d = self.spec.head_dim
            if kind == "rope" and src.shape[0] % d == 0:
                heads = src.shape[0] // d
                src = src.reshape(heads, d, *src.shape[1:])[:, self._perm].reshape(src.shape)
            elif kind == "rope_norm" and src.shape == (d,):
                src = src[self._perm].expand(dest.shape[0], d)
        if tuple(src.shape) != tuple(dest.shape):
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, but the "
                f"{self.spec.model_type} config expects {tuple(dest.shape)} (after fusion: "
                f"{tuple(src.shape)} into {tuple(dest.shape)})"
            )
        dest.copy_(src.to(device=dest.device, dtype=dest.dtype))
        self._loaded.add(name)
        return True

    def expected_hf_names(self) -> list[str]:
        """The HF tensor names a complete checkpoint provides for this config."""
        s = self.spec
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if self.lm_head is not None:
            names.append("lm_head.weight")
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            for proj in ("q", "k", "v"):
                names.append(f"{p}self_attn.{proj}_proj.weight")
                if s.qkv_bias:
                    names.append(f"{p}self_attn.{proj}_proj.bias")
            names.append(p + "self_attn.o_proj.weight")
            if s.o_bias:
                names.append(p + "self_attn.o_proj.bias")
            if s.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            for proj in ("gate", "up", "down"):
                names.append(f"{p}mlp.{proj}_proj.weight")
                if s.mlp_bias:
                    names.append(f"{p}mlp.{proj}_proj.bias")
        return names

    def check_loaded(self, source: str = "checkpoint") -> None:
        """Raise ``ValueError`` naming the tensors the checkpoint did not provide."""
        missing = [n for n in self.expected_hf_names() if n not in self._loaded]
        if missing:
            shown = ", ".join(missing[:8]) + (
                f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
            )
            raise ValueError(f"{source} is missing weights: {shown}")

    def load_hf_state_dict(
        self,
        state_dict: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        source: str = "state dict",
    ) -> None:
        """Load a whole HF-named state dict (a mapping, or ``(name, tensor)`` pairs read lazily);
        unknown names and missing weights raise ``ValueError``."""
        unknown = []
        items = state_dict.items() if isinstance(state_dict, dict) else state_dict
        for name, tensor in items:
            try:
                self.load_hf_tensor(name, tensor)
            except KeyError:
                unknown.append(name)
        if unknown:
            raise ValueError(
                f"{source} has tensors the {self.spec.model_type} model does not use: "
                + ", ".join(unknown[:8])
                + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
            )
        self.check_loaded(source)

    # ---------------------------------------------------------------- shared pieces

    def _rope_table(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotation per token: complex ``[T, 1, D/2]`` (fp32/fp64) or real ``[2, T, 1, D/2]``."""
        freqs = position_ids.float()[:, None] * self.inv_freq  # [T, D/2], float32 like HF
        cos, sin = freqs.cos(), freqs.sin()
        if self.rope_scaling != 1.0:
            cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
        if self.dtype in (torch.float32, torch.float64):
            return torch.complex(cos.to(self.dtype), sin.to(self.dtype))[:, None, :]
        return torch.stack([cos, sin]).to(self.dtype)[:, :, None, :]

    def _qkv(
        self, x: torch.Tensor, w: tuple[torch.Tensor | None, ...], rope: torch.Tensor
    ) -> torch.Tensor:
        """Input norm, fused q/k/v projection, (Qwen3) q/k norm, RoPE on q and k, in place.

        x ``[T, H]`` -> ``[T, (Hq + 2 Hk) * D]``: q heads, then k heads, then v heads.
        """
        s = self.spec
        d, nqk = s.head_dim, s.num_heads + s.num_kv_heads
        h = F.rms_norm(x, (s.hidden_size,), w[0], s.rms_norm_eps)
        qkv = F.linear(h, w[1], w[2])
        t = qkv.shape[0]
        qk = qkv[:, : nqk * d]
        if w[3] is not None:  # Qwen3: RMSNorm over each q/k head's dims
            normed = F.rms_norm(qk.view(t, nqk, d), (d,), None, s.rms_norm_eps) * w[3]
            qk.copy_(normed.view(t, nqk * d))
        if rope.is_complex():
            torch.view_as_complex(qk.view(t, nqk, d // 2, 2)).mul_(rope)
        else:
            pairs = qk.view(t, nqk, d // 2, 2)
            x0, x1 = pairs[..., 0], pairs[..., 1]
            cos, sin = rope[0], rope[1]
            rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
            pairs.copy_(rotated)
        return qkv

    def _finish_layer(
        self, x: torch.Tensor, attn: torch.Tensor, w: tuple[torch.Tensor | None, ...]
    ) -> torch.Tensor:
        """Output projection + residual, post norm, SiLU MLP + residual."""
        s = self.spec
        if w[5] is None:
            x = torch.addmm(x, attn, w[4].t())
        else:
            x = x + F.linear(attn, w[4], w[5])
        h = F.rms_norm(x, (s.hidden_size,), w[6], s.rms_norm_eps)
        gate_up = F.linear(h, w[7], w[8])
        inter = s.intermediate_size
        act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
        if w[10] is None:
            return torch.addmm(x, act, w[9].t())
        return x + F.linear(act, w[9], w[10])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (self.spec.hidden_size,), self.final_norm, self.spec.rms_norm_eps)
        return F.linear(h, self.lm_head_weight).float()

    # ---------------------------------------------------------------- engine step

    def forward(self, batch: ForwardBatch, kv: KVPool, *, reference: bool = False) -> torch.Tensor:  # type: ignore[override]
        """One engine step: write the new tokens' K/V into ``kv``, return float32 logits
        ``[len(logits_rows), vocab]`` (default rows: the last new token of each sequence).

        ``reference=True`` runs the per-sequence reference attention instead of the fast path.
        """
        if kv.num_layers != self.num_layers or kv.kv.shape[3:] != (
            self.num_kv_heads,
            self.head_dim,
        ):
            raise ValueError(
                f"{kv!r} does not fit this model ({self.num_layers} layers, "
                f"{self.num_kv_heads} kv heads, head_dim {self.head_dim})"
            )
        plan = build_attention_plan(batch)
        rows = batch.logits_rows
        if rows is None and plan.max_q != 1:
            ends, total = [], -1
            for q in batch.q_lens:
                total += q
                ends.append(total)
            rows = torch.tensor(ends, dtype=torch.long, device=batch.input_ids.device)
        if reference:
            return self._forward_reference(batch, kv, rows)
        return self.step(batch.input_ids, batch.position_ids, batch.slot_mapping, kv.kv, plan, rows)

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_buffer: torch.Tensor,
        plan: AttentionPlan,
        logits_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """The fast step as a function of tensors (``kv_buffer`` is ``KVPool.kv``, updated in place)."""
        s = self.spec
        d, hq, hk = s.head_dim, s.num_heads, s.num_kv_heads
        b, max_q, max_kv = plan.num_seqs, plan.max_q, plan.max_kv
        x = F.embedding(input_ids, self.embed)  # [T, H]
        t = x.shape[0]
        rope = self._rope_table(position_ids)
        for layer, w in enumerate(self._layer_weights):
            qkv = self._qkv(x, w, rope)  # [T, (Hq + 2Hk) * D]
            new_kv = qkv[:, hq * d :].view(t, 2, hk, d)
            pool = kv_buffer[layer]  # [S, 2, Hk, D]
            pool.index_copy_(0, slot_mapping, new_kv)
            q = qkv[:, : hq * d]
            if plan.cascade is not None:
                attn = cascade_attention(q, pool, plan.cascade, hk)
            elif plan.fresh_causal:
                qh = q.view(1, t, hq, d).transpose(1, 2)
                k = new_kv[:, 0].view(1, t, hk, d).transpose(1, 2)
                v = new_kv[:, 1].view(1, t, hk, d).transpose(1, 2)
                out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, enable_gqa=True)
                attn = out.transpose(1, 2).reshape(t, hq * d)
            else:
                gathered = pool.index_select(0, plan.gather).view(b, max_kv, 2, hk, d)
                k = gathered[:, :, 0].transpose(1, 2)  # [B, Hk, max_kv, D]
                v = gathered[:, :, 1].transpose(1, 2)
                if plan.fold_gqa:  # decode: [B, Hk, G, D] queries, mask broadcast over rows
                    qh = q.view(b, hk, hq // hk, d)
                    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=plan.attn_mask)
                    attn = out.reshape(b, hq * d)
                else:
                    if plan.q_index is not None:
                        q = q.index_select(0, plan.q_index)
                    qh = q.view(b, max_q, hq, d).transpose(1, 2)  # [B, Hq, max_q, D]
                    out = F.scaled_dot_product_attention(
                        qh, k, v, attn_mask=plan.attn_mask, enable_gqa=True
                    )
                    attn = out.transpose(1, 2).reshape(b * max_q, hq * d)
                    if plan.out_index is not None:
                        attn = attn.index_select(0, plan.out_index)
            x = self._finish_layer(x, attn, w)
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        return self._logits(x)

    # ---------------------------------------------------------------- reference paths

    def _forward_reference(
        self, batch: ForwardBatch, kv: KVPool, logits_rows: torch.Tensor | None
    ) -> torch.Tensor:
        s = self.spec
        d, hq, hk = s.head_dim, s.num_heads, s.num_kv_heads
        x = F.embedding(batch.input_ids, self.embed)
        t = x.shape[0]
        rope = self._rope_table(batch.position_ids)
        masks = [
            m if m is not None else causal_mask(q, ix.shape[0], x.device)
            for q, ix, m in zip(batch.q_lens, batch.kv_indices, batch.masks, strict=True)
        ]
        for layer, w in enumerate(self._layer_weights):
            qkv = self._qkv(x, w, rope)
            kv.kv[layer].index_copy_(0, batch.slot_mapping, qkv[:, hq * d :].view(t, 2, hk, d))
            q_all = qkv[:, : hq * d].view(t, hq, d)
            outs, start = [], 0
            for q_len, ix, m in zip(batch.q_lens, batch.kv_indices, masks, strict=True):
                keys = kv.k[layer].index_select(0, ix)  # [kv_len, Hk, D]
                values = kv.v[layer].index_select(0, ix)
                outs.append(reference_attention(q_all[start : start + q_len], keys, values, m))
                start += q_len
            x = self._finish_layer(x, torch.cat(outs), w)
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        return self._logits(x)

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
        x = F.embedding(input_ids, self.embed)
        rope = self._rope_table(position_ids)
        for w in self._layer_weights:
            qkv = self._qkv(x, w, rope)
            q = qkv[:, : hq * d].view(n, hq, d)
            k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
            v = qkv[:, (hq + hk) * d :].view(n, hk, d)
            x = self._finish_layer(x, reference_attention(q, k, v, mask), w)
        return self._logits(x)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{s.model_type}: layers={s.num_layers}, hidden={s.hidden_size}, heads={s.num_heads}, "
            f"kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, vocab={s.vocab_size}, "
            f"dtype={self.dtype}"
        )
