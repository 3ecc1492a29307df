"""One engine step's inputs (:class:`ForwardBatch`) and their validation.

The contract of ``CausalLM.forward(batch, kv)``:

- ``input_ids [T]`` are the new tokens of all sequences concatenated, ``q_lens`` says how many
  belong to each sequence, ``position_ids [T]`` their positions (Multiverse positions: sibling
  paths restart at the same position, so never assume ``arange``).
- The K/V of the new tokens are written to ``slot_mapping [T]`` of the pool *before* attention;
  ``kv_indices[i]`` lists the pool slots of ALL keys sequence ``i`` attends, in order, and its
  last ``q_lens[i]`` entries are that sequence's new tokens. The K/V list is the whole visibility
  story for a branch: the engine hands a branch only the shared prefix plus its own tokens, so
  plain causal attention over that list is Multiverse Attention.
- ``masks[i]`` (Bool ``[q_len, kv_len]``, True = may attend) overrides the causal rule for one
  sequence; ``None`` means causal: new token ``j`` sees ``kv[: kv_len - q_len + j + 1]``.
- The step returns float32 logits for ``logits_rows`` (default: the last new token of each
  sequence).

:func:`check_forward_batch` is the one place these rules are checked; every attention backend
calls it before building its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def check_forward_batch(batch: ForwardBatch) -> list[int]:
    """Raise ``ValueError`` if ``batch`` breaks the contract; return each sequence's kv_len."""
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
    if batch.groups is not None:
        _check_groups(batch)
    return kv_lens


def _check_groups(batch: ForwardBatch) -> None:
    """``batch.groups`` partitions the sequences of a decode step by a shared K/V prefix."""
    n = len(batch.q_lens)
    if any(q != 1 for q in batch.q_lens) or any(m is not None for m in batch.masks):
        raise ValueError("ForwardBatch.groups is for decode steps only (q_len 1, no masks)")
    owner = [-1] * n
    device = batch.input_ids.device
    for g, (prefix, members) in enumerate(batch.groups or []):
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
