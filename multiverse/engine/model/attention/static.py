"""The static-shape decode attention: fixed ``[B, L]`` tensors, every mask built on the device.

A decode step (one new token per sequence) of a padded batch ``B`` over a K/V-length bucket ``L``
is described by two device tensors whose shapes never change between steps of the same bucket:

- ``kv_flat [B * L]`` long: the pool slots each sequence attends, sequences concatenated in batch
  order (only the first ``sum(kv_lens)`` entries are meaningful; the rest are stale and never
  read unmasked);
- ``kv_lens [B]`` long: how many of those slots belong to each sequence (its last one is the new
  token's own slot). A padding row has length 0.

:func:`slot_table` turns them into the padded slot table ``[B, L]`` (entries past a row's length
point at the scratch slot, a pool slot no sequence ever owns), and :class:`StaticDecodePlan`
attends with a key mask ``col < kv_len`` (at least column 0 for a padding row, so no softmax row
is empty). No host-side value is read: the plan can run inside a captured CUDA graph. It equals
:func:`.reference.reference_attention` of each live row over ``pool[its slots]`` (the tests in
``tests/engine/test_static_decode.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def slot_table(kv_flat: torch.Tensor, kv_lens: torch.Tensor, num_cols: int, scratch_slot: int) -> torch.Tensor:
    """``[B, num_cols]`` long: row ``r`` holds its ``kv_lens[r]`` slots from ``kv_flat`` (rows
    concatenated in order), then ``scratch_slot``. Device ops only (no sync)."""
    starts = torch.cumsum(kv_lens, 0) - kv_lens  # [B]
    cols = torch.arange(num_cols, device=kv_flat.device)
    idx = (starts[:, None] + cols[None, :]).clamp_(max=kv_flat.shape[0] - 1)  # [B, L]
    live = cols[None, :] < kv_lens[:, None]
    return torch.where(live, kv_flat[idx], torch.full_like(idx, scratch_slot))


@dataclass(slots=True)
class StaticDecodePlan:
    """One decode step's attention over a fixed ``[B, L]`` slot table (see the module docstring).

    ``fold_gqa``: the G query heads of a KV head become G query rows (CUDA: the fused SDPA
    kernels lack GQA next to a mask); otherwise ``enable_gqa``.
    """

    table: torch.Tensor  # [B, L] long
    key_mask: torch.Tensor  # Bool [B, 1, 1, L]
    fold_gqa: bool

    @classmethod
    def build(cls, kv_flat: torch.Tensor, kv_lens: torch.Tensor, num_cols: int, scratch_slot: int,
              fold_gqa: bool) -> StaticDecodePlan:  # fmt: skip
        table = slot_table(kv_flat, kv_lens, num_cols, scratch_slot)
        cols = torch.arange(num_cols, device=kv_flat.device)
        key_mask = cols[None, :] < kv_lens.clamp(min=1)[:, None]  # padding rows see column 0
        return cls(table, key_mask[:, None, None, :], fold_gqa)

    def attend(self, q: torch.Tensor, new_kv: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """q ``[B, Hq * D]``, new_kv ``[B, 2, Hk, D]`` (already in ``pool``), pool
        ``[S, 2, Hk, D]`` -> ``[B, Hq * D]``."""
        b, cols = self.table.shape
        hk, d = pool.shape[2], pool.shape[3]
        hq = q.shape[1] // d
        gathered = pool.index_select(0, self.table.view(-1)).view(b, cols, 2, hk, d)
        k = gathered[:, :, 0].transpose(1, 2)  # [B, Hk, L, D]
        v = gathered[:, :, 1].transpose(1, 2)
        if self.fold_gqa:
            qh = q.reshape(b, hk, hq // hk, d)
            out = F.scaled_dot_product_attention(qh, k, v, attn_mask=self.key_mask)
            return out.reshape(b, hq * d)
        qh = q.reshape(b, 1, hq, d).transpose(1, 2)  # [B, Hq, 1, D]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=self.key_mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, hq * d)
