"""Multiverse Attention: the canonical layout rule (SPEC.md section 3) on token ids.

One rule, used by the trainer AND the engine:

  * :class:`LayoutState` (torch-free, in :mod:`.layout_state`; re-exported here) walks tokens
    one at a time (the engine keeps one per branch and forks/joins it); :func:`layout` runs it
    over a whole sequence (the trainer, tests, ``multiverse inspect --plot``). There is no
    second implementation anywhere in the project.
  * A :class:`Layout` holds, per token, its position id and its membership: for every nesting
    level ``l`` the id of the block whose path it is in (``block_ids[l]``, -1 if none) and the
    path's index in that block (``path_ids[l]``). Query q may attend key k iff k <= q, they are
    in the same document, and at no level they share a block but lie in different paths.
  * Masks are built from that membership: :meth:`Layout.dense_mask` (reference, small n),
    :meth:`Layout.mask_mod` / :meth:`Layout.block_mask` (flex_attention, never a dense
    ``[L, L]`` tensor: built tile row by tile row), :meth:`Layout.hf_attention_mask` (the 4-D
    additive mask Hugging Face models accept).

Block levels are well defined: ``<Path>`` and ``<Conclusion>`` only change the innermost open
block, so while a block is open the blocks around it keep their phase.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from multiverse.format.grammar import TAGS
from multiverse.format.layout_state import (  # noqa: F401 (re-exported: the rule's state walker)
    CONCLUSION,
    GOAL,
    PATHS,
    LayoutState,
    _OpenBlock,
)

# --------------------------------------------------------------------------------- Layout


@dataclass(slots=True)
class Layout:
    """Positions and membership of a whole sequence (or a packed row of sequences)."""

    position_ids: torch.Tensor  # [n] long
    block_ids: torch.Tensor  # [D, n] long, -1 = not in a path at that level
    path_ids: torch.Tensor  # [D, n] long
    doc_ids: torch.Tensor  # [n] long (0 for a single sequence)

    def __len__(self) -> int:
        return int(self.position_ids.shape[0])

    @property
    def num_levels(self) -> int:
        return int(self.block_ids.shape[0])

    def to(self, device: Any) -> Layout:
        return Layout(*(t.to(device) for t in (self.position_ids, self.block_ids, self.path_ids, self.doc_ids)))

    # -- masks -----------------------------------------------------------------------------
    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """May query index ``q`` attend key index ``k``? Broadcasting over index tensors; the
        single definition every mask below is built from."""
        return (k <= q) & self.compatible(q, k)

    def compatible(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The membership part of :meth:`allowed` (causality left out): same document and no
        level where q and k share a block but lie in different paths."""
        ok = self.doc_ids[q] == self.doc_ids[k]
        for level in range(self.num_levels):
            bq, bk = self.block_ids[level][q], self.block_ids[level][k]
            pq, pk = self.path_ids[level][q], self.path_ids[level][k]
            ok = ok & ~((bq == bk) & (bq >= 0) & (pq != pk))
        return ok

    def segments(self) -> torch.Tensor:
        """Start index of every run of tokens with identical membership (document, block and
        path at every level); tokens in one run are interchangeable for the mask."""
        n = len(self)
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        rows = torch.cat([self.doc_ids[None], self.block_ids, self.path_ids], 0)
        change = (rows[:, 1:] != rows[:, :-1]).any(0)
        return torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(change).flatten() + 1])

    def dense_mask(self, rows: slice | None = None) -> torch.Tensor:
        """Reference boolean mask ``[n, n]`` (or ``[rows, n]``); True where q may attend k."""
        n = len(self)
        q = torch.arange(n, device=self.position_ids.device)
        if rows is not None:
            q = q[rows]
        k = torch.arange(n, device=self.position_ids.device)
        return self.allowed(q[:, None], k[None, :])

    def mask_mod(self):
        """A ``flex_attention`` mask_mod closure over this layout's id tensors."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self.allowed(q_idx, kv_idx)

        return mask_mod

    def block_mask(self, block_size: int = 128, device: Any = None):
        """A flex_attention ``BlockMask`` built from the membership, never from an ``n x n``
        tensor: from the membership runs when there are few (the usual case), else tile row by
        tile row (peak extra memory ``block_size x n`` booleans)."""
        from torch.nn.attention.flex_attention import BlockMask

        lay = self if device is None else self.to(device)
        n = len(lay)
        dev = lay.position_ids.device
        seg = lay.segments()
        if len(seg) <= 4096:
            partial, full = lay._tiles_from_segments(seg, block_size)
        else:
            partial, full = lay._tiles_by_rows(block_size)
        kv_num, kv_idx = _to_indices(partial)
        full_num, full_idx = _to_indices(full)
        return BlockMask.from_kv_blocks(
            kv_num.to(dev), kv_idx.to(dev), full_num.to(dev), full_idx.to(dev),
            BLOCK_SIZE=block_size, mask_mod=lay.mask_mod(), seq_lengths=(n, n),
        )  # fmt: skip

    def _tiles_from_segments(self, seg: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile classification from the (few) membership runs: a tile strictly below the
        diagonal is full iff every pair of runs it touches is compatible, listed iff one is;
        diagonal tiles are partial (causal). Exact, O(runs^2 + tiles)."""
        n = len(self)
        nb = -(-n // block_size)
        compat = self.compatible(seg[:, None], seg[None, :]).cpu().to(torch.int32)  # [S, S]
        s = len(seg)
        pre = torch.zeros(s + 1, s + 1, dtype=torch.int64)
        pre[1:, 1:] = compat.cumsum(0).cumsum(1)
        starts = torch.arange(nb) * block_size
        ends = torch.clamp(starts + block_size, max=n) - 1
        seg_c = seg.cpu()
        a = torch.searchsorted(seg_c, starts, right=True) - 1  # first run of each tile
        b = torch.searchsorted(seg_c, ends, right=True) - 1  # last run of each tile
        qa, qb = a[:, None], b[:, None] + 1
        ka, kb = a[None, :], b[None, :] + 1
        count = pre[qb, kb] - pre[qa, kb] - pre[qb, ka] + pre[qa, ka]
        pairs = (qb - qa) * (kb - ka)
        below = torch.tril(torch.ones(nb, nb, dtype=torch.bool), -1)
        diag = torch.eye(nb, dtype=torch.bool)
        full = below & (count == pairs)
        partial = (below & (count > 0) & ~full) | diag
        return partial, full

    def _tiles_by_rows(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile classification by evaluating the mask one tile row at a time (any membership,
        peak memory ``block_size x n`` booleans)."""
        n = len(self)
        nb = -(-n // block_size)
        dev = self.position_ids.device
        partial = torch.zeros(nb, nb, dtype=torch.bool)
        full = torch.zeros(nb, nb, dtype=torch.bool)
        keys = torch.arange(nb * block_size, device=dev)
        valid_k = keys < n
        keys_c = keys.clamp(max=n - 1)
        for i in range(nb):
            q = torch.arange(i * block_size, (i + 1) * block_size, device=dev)
            kk = (i + 1) * block_size
            valid = (q < n)[:, None] & valid_k[None, :kk]
            m = self.allowed(q.clamp(max=n - 1)[:, None], keys_c[None, :kk]) & valid

            def per_tile(x: torch.Tensor, i: int = i) -> torch.Tensor:
                return x.view(block_size, i + 1, block_size).transpose(0, 1).reshape(i + 1, -1)

            anyv = per_tile(m).any(1).cpu()
            allv = per_tile(m | ~valid).all(1).cpu()  # padding beyond n never counts
            allv[i] = False  # diagonal tiles stay partial (causal), as in the run-based path
            full[i, : i + 1] = allv
            partial[i, : i + 1] = anyv & ~allv
        return partial, full

    def hf_attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """4-D additive mask ``[1, 1, n, n]`` (0 where allowed, dtype's min elsewhere) that
        Hugging Face causal LMs accept as ``attention_mask`` together with ``position_ids``."""
        allowed = self.dense_mask()
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]

    # -- metrics ---------------------------------------------------------------------------
    def depth_tokens(self, prompt_len: int = 0) -> int:
        """Sequential depth of the tokens after the prompt: max position + 1 - prompt_len."""
        if len(self) <= prompt_len:
            return 0
        return int(self.position_ids[prompt_len:].max()) + 1 - prompt_len

    def parallel_degree(self, prompt_len: int = 0) -> float:
        """# parallel (SPEC 2): generated tokens / sequential depth (1.0 for plain text)."""
        depth = self.depth_tokens(prompt_len)
        return (len(self) - prompt_len) / depth if depth > 0 else 1.0


def _to_indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nb_q, nb_kv] bool -> (num [1,1,nb_q] int32, indices [1,1,nb_q,nb_kv] int32)."""
    num = blocks.sum(1).to(torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return num[None, None], order[None, None]


# --------------------------------------------------------------------------------- entry points


def layout_tags(tags: Sequence[str | None]) -> Layout:
    """Layout of a sequence given, per token, its tag (one of :data:`TAGS`) or None."""
    st = LayoutState()
    n = len(tags)
    positions = [0] * n
    members: list[tuple[tuple[int, int], ...]] = [()] * n
    for i, tag in enumerate(tags):
        positions[i] = st.step(tag)
        members[i] = st.membership
    levels = max((len(m) for m in members), default=0)
    block_ids = torch.full((levels, n), -1, dtype=torch.long)
    path_ids = torch.full((levels, n), -1, dtype=torch.long)
    if levels:
        # rows of (token, level, block, path) for every membership entry, then one scatter
        flat = [(i, lvl, b, p) for i, m in enumerate(members) for lvl, (b, p) in enumerate(m)]
        idx = torch.tensor(flat, dtype=torch.long)
        block_ids[idx[:, 1], idx[:, 0]] = idx[:, 2]
        path_ids[idx[:, 1], idx[:, 0]] = idx[:, 3]
    return Layout(
        torch.tensor(positions, dtype=torch.long), block_ids, path_ids, torch.zeros(n, dtype=torch.long)
    )


def tags_of(token_ids: Sequence[int] | torch.Tensor, tag_ids: Mapping[str, int]) -> list[str | None]:
    """Map token ids to tags (None for ordinary tokens) using ``tag_ids`` (tag -> id)."""
    missing = [t for t in TAGS if t not in tag_ids]
    if missing:
        raise ValueError(f"tag_ids is missing {missing}: it must map all 12 tags to token ids")
    by_id = {int(v): k for k, v in tag_ids.items() if k in TAGS}
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    return [by_id.get(int(i)) for i in ids]


def layout(token_ids: Sequence[int] | torch.Tensor, tag_ids: Mapping[str, int]) -> Layout:
    """Layout of one token-id sequence (``tag_ids``: each of the 12 tag strings -> its id)."""
    return layout_tags(tags_of(token_ids, tag_ids))


def positions_and_mask(
    token_ids: Sequence[int] | torch.Tensor, tag_ids: Mapping[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable public entry point: ``(position_ids LongTensor[n], mask BoolTensor[n, n])`` with
    ``mask[q, k]`` True when query q may attend key k."""
    lay = layout(token_ids, tag_ids)
    return lay.position_ids, lay.dense_mask()


def pack(layouts: Sequence[Layout]) -> Layout:
    """Several sequences in one row: positions restart per document, block ids are made unique,
    and no token attends across documents."""
    if not layouts:
        raise ValueError("pack needs at least one layout")
    levels = max(x.num_levels for x in layouts)
    pos, blocks, paths, docs = [], [], [], []
    offset = 0
    for d, x in enumerate(layouts):
        n = len(x)
        b = torch.full((levels, n), -1, dtype=torch.long)
        p = torch.full((levels, n), -1, dtype=torch.long)
        if x.num_levels:
            b[: x.num_levels] = torch.where(x.block_ids >= 0, x.block_ids + offset, -1)
            p[: x.num_levels] = x.path_ids
            offset += int(x.block_ids.max()) + 1
        pos.append(x.position_ids)
        blocks.append(b)
        paths.append(p)
        docs.append(torch.full((n,), d, dtype=torch.long))
    return Layout(torch.cat(pos), torch.cat(blocks, 1), torch.cat(paths, 1), torch.cat(docs))
