"""The reference attention backend: per sequence, explicit fp32 softmax(QK^T) V with a Bool mask.

This is the definition the fast backends are tested against: slow (one gather and one
attention per sequence and layer, a dense ``[q_len, kv_len]`` mask), but every step is plain
arithmetic. GQA is done by repeating K/V heads; scores and softmax are float32 whatever the
model dtype. ``CausalLM.forward_full`` uses :func:`reference_attention` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multiverse.engine.model.batch import ForwardBatch, check_forward_batch


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


@dataclass(slots=True)
class ReferencePlan:
    """Each sequence's new-token count, key slots and (explicit) Bool mask."""

    q_lens: list[int]
    kv_indices: list[torch.Tensor]  # per sequence [kv_len] long
    masks: list[torch.Tensor]  # per sequence Bool [q_len, kv_len], causal ones made explicit

    def attend(self, q: torch.Tensor, new_kv: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """q ``[T, Hq * D]``, pool ``[S, 2, Hk, D]`` -> ``[T, Hq * D]`` (``new_kv`` unused)."""
        t, d = q.shape[0], pool.shape[-1]
        q_all = q.view(t, q.shape[1] // d, d)  # [T, Hq, D]
        outs, start = [], 0
        for q_len, ix, m in zip(self.q_lens, self.kv_indices, self.masks, strict=True):
            keys = pool[:, 0].index_select(0, ix)  # [kv_len, Hk, D]
            values = pool[:, 1].index_select(0, ix)
            outs.append(reference_attention(q_all[start : start + q_len], keys, values, m))
            start += q_len
        return torch.cat(outs)


def build_reference_plan(batch: ForwardBatch) -> ReferencePlan:
    """Validate ``batch`` and make every sequence's mask explicit (``ForwardBatch.groups`` is
    checked but not used: sharing a prefix does not change what a sequence attends)."""
    check_forward_batch(batch)
    device = batch.input_ids.device
    masks = [
        m if m is not None else causal_mask(q, ix.shape[0], device)
        for q, ix, m in zip(batch.q_lens, batch.kv_indices, batch.masks, strict=True)
    ]
    return ReferencePlan(batch.q_lens, batch.kv_indices, masks)
