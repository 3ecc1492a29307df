"""The fast attention backend: one ``scaled_dot_product_attention`` call per layer for a batch.

:func:`build_attention_plan` turns a :class:`ForwardBatch` into index and mask tensors once per
step (no device sync); every layer then runs :meth:`AttentionPlan.attend`:

- on CPU where the compiled kernel is built, a decode step without custom masks runs the
  one-pass kernel (:mod:`.native`), reading K/V in the pool by slot (with ``groups``: each
  shared prefix once for its members); where it cannot run (bfloat16, several threads) the
  same plan builds the torch path below on first use;
- a single fresh sequence (prefill, no cached prefix, no custom mask) attends its own new K/V
  with ``is_causal`` and reads nothing back from the pool;
- a batch with ``groups`` runs cascade attention (:mod:`.cascade`);
- otherwise one gather of every sequence's K/V into a padded ``[B, max_kv]`` batch and one SDPA
  call with a small Bool mask: key padding for decode, ``[B, 1, max_q, max_kv]`` for prefill
  chunks and custom masks. Never a dense float ``[L, L]`` mask.

On CUDA a decode step folds each KV head's G query heads into G query rows (``fold_gqa``), as
CUDA's fused kernels lack GQA support next to a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from multiverse.engine.model import cpu_kernels
from multiverse.engine.model.attention import native as native_kernel
from multiverse.engine.model.attention.cascade import CascadePlan, build_cascade_tensors
from multiverse.engine.model.batch import ForwardBatch, check_forward_batch


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
    native: native_kernel.DecodeIndex | None = None  # CPU decode without custom masks
    batch: ForwardBatch | None = None  # with ``native``: for the torch path where it cannot run
    torch_plan: AttentionPlan | None = None  # that path's tensors, built on first need

    def layer_attention(self, pool: torch.Tensor, q_width: int, q_stride: int):
        """For a step whose layers' queries are rows ``q_stride`` floats apart and whose pools
        have ``pool``'s shape: the one-pass kernel bound once for all of them
        (:class:`.native.LayerAttention`, what :meth:`attend` runs, without its per-layer
        checks), or None where :meth:`attend` would not run that kernel."""
        fn = native_kernel.usable(pool) if self.native is not None else None
        if fn is None:
            return None
        return native_kernel.LayerAttention(fn, self.native, pool, q_width, q_stride)

    def attend(self, q: torch.Tensor, new_kv: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """q ``[T, Hq * D]``, new_kv ``[T, 2, Hk, D]``, pool ``[S, 2, Hk, D]`` -> ``[T, Hq * D]``."""
        if self.native is not None:
            fn = native_kernel.usable(pool)
            if fn is not None:  # one pass over each sequence's K/V in the pool, no copy
                return native_kernel.decode_attention(fn, q, pool, self.native)
            if self.torch_plan is None:  # bfloat16, several threads, no kernel: gather + SDPA
                assert self.batch is not None
                self.torch_plan = build_attention_plan(self.batch, native=False)
            return self.torch_plan.attend(q, new_kv, pool)
        if self.cascade is not None:
            return self.cascade.attend(q, new_kv, pool)
        t, hk, d = q.shape[0], pool.shape[2], pool.shape[3]
        hq = q.shape[1] // d
        if self.fresh_causal:
            qh = q.view(1, t, hq, d).transpose(1, 2)  # [1, Hq, T, D]
            k = new_kv[:, 0].view(1, t, hk, d).transpose(1, 2)  # [1, Hk, T, D]
            v = new_kv[:, 1].view(1, t, hk, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2).reshape(t, hq * d)
        b, max_q, max_kv = self.num_seqs, self.max_q, self.max_kv
        assert self.gather is not None
        gathered = pool.index_select(0, self.gather).view(b, max_kv, 2, hk, d)
        k = gathered[:, :, 0].transpose(1, 2)  # [B, Hk, max_kv, D]
        v = gathered[:, :, 1].transpose(1, 2)
        if self.fold_gqa:  # decode: [B, Hk, G, D] queries, mask broadcast over rows
            qh = q.view(b, hk, hq // hk, d)
            out = F.scaled_dot_product_attention(qh, k, v, attn_mask=self.attn_mask)
            return out.reshape(b, hq * d)
        if self.q_index is not None:
            q = q.index_select(0, self.q_index)
        qh = q.view(b, max_q, hq, d).transpose(1, 2)  # [B, Hq, max_q, D]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=self.attn_mask, enable_gqa=True)
        attn = out.transpose(1, 2).reshape(b * max_q, hq * d)
        if self.out_index is not None:
            attn = attn.index_select(0, self.out_index)
        return attn


def build_attention_plan(
    batch: ForwardBatch, fold_gqa: bool | None = None, native: bool | None = None
) -> AttentionPlan:
    """Validate a batch's per-sequence lists and build the fast path's tensors (no device sync).

    ``fold_gqa`` (default: on CUDA) lets a decode step (every ``q_len == 1``) attend with queries
    ``[B, Hk, G, D]`` against un-repeated K/V, so SDPA needs no GQA support next to a mask
    (CUDA's fused kernels with a mask lack it); on CPU ``enable_gqa`` is faster.
    """
    kv_lens = check_forward_batch(batch)
    q_lens = batch.q_lens
    num_seqs = len(q_lens)
    max_q, max_kv = max(q_lens), max(kv_lens)
    device = batch.input_ids.device
    has_masks = any(m is not None for m in batch.masks)
    if native is None:  # where the kernel is built (it checks dtype and threads per layer)
        native = device.type == "cpu" and cpu_kernels.loaded() is not None
    if native and max_q == 1 and not has_masks:  # decode: the one-pass kernel, where it runs
        index = (native_kernel.DecodeIndex.per_sequence(batch.kv_indices) if batch.groups is None
                 else native_kernel.DecodeIndex.grouped(batch.kv_indices, batch.groups))  # fmt: skip
        return AttentionPlan(num_seqs, 1, max_kv, native=index, batch=batch)
    if batch.groups is not None:
        return AttentionPlan(num_seqs, max_q, max_kv, cascade=build_cascade_tensors(batch))

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
