"""Decode attention read straight from the K/V pool in one pass, by the compiled kernel of
:mod:`..cpu_kernels` (``decode_attend``, AVX-512, one thread).

A decode step's queries (one new token per sequence) attend the pool rows their sequences list;
nothing is gathered into a padded copy. The kernel walks each segment of keys in blocks that fit
L1: per block it computes every query head's scores from the keys, updates the online softmax
(running max, sum, unnormalised output; flash-decoding style) and adds the values, so each
key row is read from memory once. All G query heads of a KV head use the same key load, and a
shared prefix (:meth:`DecodeIndex.grouped`, forked paths) is read once for all its rows. Heads of
at most 32 take 16 keys' scores at a time (their 16 sums across lanes in one shuffle tree: key by
key, those sums cost more than the products). A sequence's slots come in runs of consecutive
pool rows (:mod:`multiverse.engine.kv_manager`, Runs), which the reads follow page by page.
The reference: the attention backends' torch paths (``build_attention_plan(native=False)``,
``"reference"``): ``tests/engine/test_attention_backends.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multiverse.engine.model import cpu_kernels

MAX_HEAD_DIM = 128  # the attention kernel keeps a head's K in registers: 8 x 16 floats


@dataclass(slots=True)
class DecodeIndex:
    """Which pool slots each query row of a decode step attends, for :func:`decode_attention`.

    ``segments [S, 4]`` long, each ``(slot_lo, slot_hi, row_lo, row_hi)``: the rows
    ``rows[row_lo:row_hi]`` attend the keys at ``slots[slot_lo:slot_hi]``. A row's keys are the
    union of its segments, in any order (the softmax is one over all of them): a shared prefix
    is one segment for all its rows, read once (:meth:`grouped`). Built once per step; checked
    against the pool once (:meth:`check`), not per layer.
    """

    slots: torch.Tensor  # [K] long
    segments: torch.Tensor  # [S, 4] long
    rows: torch.Tensor  # [R] long
    num_rows: int
    checked_slots: int = -1  # the pool size the index was last checked against

    @classmethod
    def per_sequence(cls, kv_indices: list[torch.Tensor]) -> DecodeIndex:
        """Row ``i`` attends ``kv_indices[i]`` (one segment per row)."""
        segs, at = [], 0
        for i, ix in enumerate(kv_indices):
            segs.append((at, at + int(ix.shape[0]), i, i + 1))
            at += int(ix.shape[0])
        n = len(kv_indices)
        return cls(torch.cat(kv_indices), torch.tensor(segs, dtype=torch.long), torch.arange(n), n)

    @classmethod
    def grouped(
        cls, kv_indices: list[torch.Tensor], groups: list[tuple[torch.Tensor, list[int]]]
    ) -> DecodeIndex:
        """``ForwardBatch.groups``: each group's prefix one segment for all its members, then
        each member's own slots (``kv_indices[i]`` after the prefix) its own."""
        parts, segs, rows, at = [], [], [], 0
        for prefix, members in groups:
            p = int(prefix.shape[0])
            parts.append(prefix)
            segs.append((at, at + p, len(rows), len(rows) + len(members)))
            rows += members
            at += p
            for i in members:
                own = kv_indices[i][p:]
                parts.append(own)
                segs.append((at, at + int(own.shape[0]), len(rows), len(rows) + 1))
                rows.append(i)
                at += int(own.shape[0])
        seg_t = torch.tensor(segs, dtype=torch.long)
        return cls(torch.cat(parts), seg_t, torch.tensor(rows, dtype=torch.long), len(kv_indices))

    def check(self, num_slots: int) -> None:
        """Raise ``ValueError`` unless every slot is in ``[0, num_slots)``, every segment within
        the slot and row lists, every row in ``[0, num_rows)`` and in a non-empty segment (the
        kernel reads pool rows by these numbers). Once per pool size."""
        if self.checked_slots == num_slots:
            return
        slots, segs, rows, n = self.slots, self.segments, self.rows, self.num_rows
        if (slots.dtype != torch.long or segs.dtype != torch.long or rows.dtype != torch.long
                or segs.dim() != 2 or segs.shape[1] != 4 or not (slots.is_contiguous()
                and segs.is_contiguous() and rows.is_contiguous())):  # fmt: skip
            raise ValueError(
                "decode index: slots, segments [S, 4] and rows must be contiguous long tensors"
            )
        lo, hi, rlo, rhi = segs.unbind(1)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
            raise ValueError(f"decode attention: slots outside [0, {num_slots})")
        bad = (
            (lo < 0)
            | (hi < lo)
            | (hi > slots.numel())
            | (rlo < 0)
            | (rhi < rlo)
            | (rhi > rows.numel())
        )
        if bool(bad.any()) or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n)):
            raise ValueError(
                "decode attention: a segment outside the slot or row lists, or a row outside [0, num_rows)"
            )
        covered = torch.zeros(n, dtype=torch.bool)
        for a, b, r0, r1 in segs.tolist():
            if b > a:
                covered[rows[r0:r1]] = True
        if not bool(covered.all()):
            raise ValueError("decode attention: a row attends no key")
        self.checked_slots = num_slots


def usable(pool: torch.Tensor):
    """The loaded kernels where :func:`decode_attention` runs on this layer's ``pool`` (float32,
    contiguous, head_dim <= :data:`MAX_HEAD_DIM`, one torch thread), else None."""
    fn = cpu_kernels.loaded()
    if (fn is None or pool.dtype != torch.float32 or pool.shape[-1] > MAX_HEAD_DIM
            or torch.get_num_threads() != 1 or not pool.is_contiguous()):  # fmt: skip
        return None
    return fn


class LayerAttention:
    """:func:`decode_attention` for every layer of one step, checked once: queries the first
    ``q_width`` floats of contiguous rows ``[N, q_stride]`` (a layer's q/k/v output) and layer
    pools of ``pool``'s shape, contiguous. ``layer(qkv, pool)`` returns the same values as
    ``decode_attention(fn, qkv[:, :q_width], pool, index)`` in one buffer that the next call
    overwrites (a step's layers use it one after the other)."""

    __slots__ = ("call", "rest", "out", "q_shape", "q_stride", "pool_shape", "index")

    def __init__(self, fn, index: DecodeIndex, pool: torch.Tensor, q_width: int, q_stride: int):
        s, _, hk, d = pool.shape
        n, g = index.num_rows, q_width // (hk * d)
        if (pool.dtype != torch.float32 or not pool.is_contiguous() or d > MAX_HEAD_DIM or g < 1
                or q_width != hk * g * d or q_stride < q_width):  # fmt: skip
            raise ValueError(f"decode attention: q width {q_width} (stride {q_stride}) for {n} rows, "
                             f"pool {tuple(pool.shape)} {pool.dtype} (float32, head_dim <= "
                             f"{MAX_HEAD_DIM})")  # fmt: skip
        index.check(s)
        self.out = torch.empty(n, q_width)
        self.call, self.q_shape, self.q_stride = fn.decode_attend, (n, q_stride), (q_stride, 1)
        self.pool_shape = pool.shape
        self.rest = (index.slots.data_ptr(), index.segments.data_ptr(), index.rows.data_ptr(),
                     self.out.data_ptr(), n, index.segments.shape[0], hk, g, d, q_stride, d**-0.5)  # fmt: skip
        self.index = index  # its tensors stay alive while the kernel reads them

    def __call__(self, q: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        if (q.shape != self.q_shape or q.stride() != self.q_stride or q.dtype != torch.float32
                or pool.shape != self.pool_shape or not pool.is_contiguous()
                or pool.dtype != torch.float32):  # fmt: skip
            raise ValueError("decode attention: a layer's q or pool differs from the step's")
        return self.run(q.data_ptr(), pool.data_ptr())

    def run(self, q_ptr: int, pool_ptr: int) -> torch.Tensor:
        """The kernel on the queries at ``q_ptr`` and the pool at ``pool_ptr``, unchecked."""
        rc = self.call(q_ptr, pool_ptr, *self.rest)
        if rc != 0:
            raise MemoryError(f"decode attention: the kernel could not allocate its scratch ({rc})")
        return self.out


def decode_attention(fn, q: torch.Tensor, pool: torch.Tensor, index: DecodeIndex) -> torch.Tensor:
    """One decode step's attention read straight from the pool in one pass with the loaded
    kernels ``fn``: q ``[N, Hq * D]`` float32 (rows may be strided), ``pool [S, 2, Hk, D]``
    contiguous float32, ``index`` which slots each row attends -> ``[N, Hq * D]``; query head
    ``h`` reads KV head ``h // (Hq // Hk)``; float32 online softmax."""
    n = index.num_rows
    if q.dtype != torch.float32 or q.dim() != 2 or q.shape[0] != n or q.stride(1) != 1:
        raise ValueError(f"decode attention: q {tuple(q.shape)} {q.dtype} for {n} rows "
                         f"(float32, rows of unit stride)")  # fmt: skip
    stride = q.stride(0) if n > 1 else q.shape[1]  # one row: its stride is never read
    return LayerAttention(fn, index, pool, q.shape[1], stride).run(q.data_ptr(), pool.data_ptr())
