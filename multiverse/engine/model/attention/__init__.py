"""Attention backends: how one layer's new queries attend the K/V in the pool.

A backend is a function ``ForwardBatch -> AttentionMetadata``: it validates the batch (with
:func:`~multiverse.engine.model.batch.check_forward_batch`) and builds, once per step, whatever
index and mask tensors it needs. ``CausalLM.step`` then calls ``metadata.attend`` once per layer,
after writing the layer's new K/V into the pool. Backends hold no state between steps.

Backends (:data:`ATTENTION_BACKENDS`):

- ``"reference"`` (:mod:`.reference`): per sequence, fp32 softmax with a dense Bool mask; the
  definition every other backend is tested against (``tests/engine/test_attention_backends.py``).
- ``"sdpa"`` (:mod:`.sdpa`): the engine's fast path, one batched SDPA call per layer; hands a
  batch with ``groups`` to the cascade kernel; a CPU decode step to the one-pass compiled
  kernel (:mod:`.native`) where it is built.
- ``"cascade"`` (:mod:`.cascade`): decode steps whose sequences share K/V prefixes
  (``ForwardBatch.groups`` required); each shared prefix is read once per group.
"""

from __future__ import annotations

from typing import Protocol

import torch

from multiverse.engine.model.attention.cascade import (
    CascadePlan,
    build_cascade_plan,
    cascade_attention,
)
from multiverse.engine.model.attention.reference import (
    ReferencePlan,
    build_reference_plan,
    causal_mask,
    reference_attention,
)
from multiverse.engine.model.attention.sdpa import AttentionPlan, build_attention_plan
from multiverse.engine.model.batch import ForwardBatch

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionPlan",
    "CascadePlan",
    "ReferencePlan",
    "build_attention_plan",
    "build_cascade_plan",
    "build_reference_plan",
    "cascade_attention",
    "causal_mask",
    "reference_attention",
]


class AttentionMetadata(Protocol):
    """One step's attention, built by a backend from a :class:`ForwardBatch`, used by every layer.

    ``attend(q, new_kv, pool)`` takes, for one layer:

    - ``q [T, Hq * D]``: the queries of the step's T new tokens (RoPE applied, sequences
      concatenated in batch order, may be a non-contiguous view);
    - ``new_kv [T, 2, Hk, D]``: their keys and values, already written to ``pool`` at
      ``batch.slot_mapping``;
    - ``pool [S, 2, Hk, D]``: the layer's slice of ``KVPool.kv``; read only.

    It returns ``[T, Hq * D]`` in q's dtype, equal (up to float rounding) to
    :func:`~.reference.reference_attention` of each sequence's queries over the keys and values
    at ``pool[batch.kv_indices[i]]`` with ``batch.masks[i]`` (``None``: causal), query head ``h``
    reading KV head ``h // (Hq // Hk)``.
    """

    def attend(self, q: torch.Tensor, new_kv: torch.Tensor, pool: torch.Tensor) -> torch.Tensor: ...


class AttentionBackend(Protocol):
    """Builds a step's :class:`AttentionMetadata`; raises ``ValueError`` for a batch that breaks
    the :class:`ForwardBatch` contract or that the backend cannot run."""

    def __call__(self, batch: ForwardBatch) -> AttentionMetadata: ...


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "reference": build_reference_plan,
    "sdpa": build_attention_plan,
    "cascade": build_cascade_plan,
}
"""Every backend by name; ``CausalLM.forward`` uses ``"sdpa"`` (``"reference"`` on request)."""
