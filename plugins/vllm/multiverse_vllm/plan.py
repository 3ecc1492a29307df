"""What the plugin computes from token ids alone (no vLLM here, so the main suite tests it).

* :func:`layout_positions`: the position hook's answer (SPEC 3 positions as three equal M-RoPE
  rows, which is plain RoPE, and the decode delta).
* :func:`isolated_runs`: the tokens of a prompt a causal engine cannot compute exactly: every
  token of a sibling path (path index >= 1, at any level) does not see some earlier token. They
  are grouped by their outermost such path, with the sequence the path was generated in (its
  *context*: the tokens it sees, in order), whose K/V a path request left with the connector.
* :func:`plan_load`: for a new request, the K/V the connector must supply from the first token
  vLLM has not computed up to the last isolated token, as copies out of saved sequences; or the
  reason it cannot (a saved sequence missing or evicted).
* :func:`save_range`: which tokens of a path-closing request are kept (the path's own tokens from
  the block boundary at or before its start: the rest is in every request's prefix cache).
* :func:`seq_key`: the key a token sequence is saved under; :class:`Entries`: the book of saved
  sequences and its memory bound.

The layout rule is the project's one implementation (:mod:`multiverse.format.layout`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from multiverse.format.layout import Layout, layout

__all__ = [
    "Copy",
    "Entries",
    "Run",
    "isolated_runs",
    "layout_positions",
    "plan_load",
    "save_range",
    "seq_key",
]


def seq_key(token_ids: Sequence[int]) -> str:
    """The key of a token sequence (what a saved K/V entry is found by)."""
    return hashlib.blake2b(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes(),
                           digest_size=16).hexdigest()  # fmt: skip


def layout_positions(token_ids: Sequence[int], tag_ids: Mapping[str, int], dims: int = 3) -> tuple[torch.Tensor, int]:  # fmt: skip
    """``(positions [dims, n] int64, delta)``: the layout rule's position of every token, the same
    in every row (M-RoPE with equal rows is plain RoPE), and the offset vLLM adds to a generated
    token's index (``position = index + delta``: the text after the prompt runs on from its last
    position)."""
    n = len(token_ids)
    if n == 0:
        return torch.zeros(dims, 0, dtype=torch.int64), 0
    pos = layout(list(token_ids), tag_ids).position_ids
    return pos.unsqueeze(0).expand(dims, n).contiguous(), int(pos[-1]) + 1 - n


@dataclass(frozen=True, slots=True)
class Run:
    """The tokens ``[start, end)`` of one outermost sibling path, and its context: the indices of
    every token its last token sees (the path request's sequence ends with them)."""

    start: int
    end: int
    context: tuple[int, ...]


def isolated_runs(token_ids: Sequence[int], tag_ids: Mapping[str, int], lay: Layout | None = None) -> list[Run]:  # fmt: skip
    """The outermost sibling paths of ``token_ids`` (see the module docstring), in order."""
    lay = lay if lay is not None else layout(list(token_ids), tag_ids)
    runs: list[Run] = []
    n = len(lay)
    # a token sees every earlier one unless, at some level, it is in a path after its block's first
    isolated = (
        ((lay.block_ids >= 0) & (lay.path_ids > 0)).any(0).tolist()
        if lay.num_levels
        else [False] * n
    )
    j = 0
    while j < n:
        if not isolated[j]:
            j += 1
            continue
        # the outermost level at which token j is in a path other than its block's first
        level = next(lv for lv in range(lay.num_levels)
                     if lay.block_ids[lv, j] >= 0 and lay.path_ids[lv, j] > 0)  # fmt: skip
        b, p = lay.block_ids[level, j], lay.path_ids[level, j]
        end = j
        while end < n and lay.block_ids[level, end] == b and lay.path_ids[level, end] == p:
            end += 1
        keys = torch.arange(end)
        seen = lay.compatible(torch.full((end,), end - 1), keys)
        runs.append(Run(j, end, tuple(int(k) for k in keys[seen])))
        j = end
    return runs


def save_range(token_ids: Sequence[int], tag_ids: Mapping[str, int], block_size: int) -> tuple[int, int] | None:  # fmt: skip
    """For a request that closes a path (its prompt ends ``</Path>`` + the separator inside an
    open block's path): the token range ``[from, n)`` of the prompt to keep; None for any other
    request. ``from`` is the block boundary at or before the path's first token."""
    n = len(token_ids)
    if n < 2 or int(token_ids[-2]) != int(tag_ids["</Path>"]):
        return None
    lay = layout(list(token_ids), tag_ids)
    if lay.num_levels == 0 or lay.block_ids[:, -1].max() < 0:
        return None
    level = max(lv for lv in range(lay.num_levels) if lay.block_ids[lv, -1] >= 0)
    b, p = lay.block_ids[level, -1], lay.path_ids[level, -1]
    start = n - 1
    while (
        start > 0 and lay.block_ids[level, start - 1] == b and lay.path_ids[level, start - 1] == p
    ):
        start -= 1
    return (start // block_size) * block_size, n


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy tokens ``[src, src + length)`` of the saved sequence ``key`` to the request's token
    indices ``[dst, dst + length)``."""

    key: str
    src: int
    dst: int
    length: int


def plan_load(token_ids: Sequence[int], tag_ids: Mapping[str, int], num_computed: int,
              saved: Callable[[str], tuple[int, int] | None]) -> tuple[list[Copy], str | None]:  # fmt: skip
    """The copies that supply every token from ``num_computed`` up to the last isolated one,
    and None; or ``([], reason)`` when a needed saved sequence is missing or does not cover the
    tokens. ``saved(key)`` -> ``(from, n)`` of the entry (see :func:`save_range`) or None.
    ``([], None)``: nothing to load (no isolated token beyond what vLLM has)."""
    ids = [int(t) for t in token_ids]
    lay = layout(ids, tag_ids)
    runs = [r for r in isolated_runs(ids, tag_ids, lay) if r.end > num_computed]
    if not runs:
        return [], None
    copies: list[Copy] = []
    at = num_computed
    for r in runs:
        if at < r.start:  # plain tokens before the run: the first path of their block has them
            got = _plain(ids, at, r.start, saved)
            if isinstance(got, str):
                return [], got
            copies.extend(got)
            at = r.start
        seq = [ids[k] for k in r.context]
        key = seq_key(seq)
        entry = saved(key)
        m = len(seq)
        lo = m - (r.end - at)  # the run's tokens (from `at`) are the context's last ones
        if entry is None:
            return (
                [],
                f"no saved K/V for the path at tokens {r.start}-{r.end - 1} (never saved, or evicted)",
            )
        if entry[0] > lo or entry[1] < m:
            return (
                [],
                f"the saved K/V of the path at tokens {r.start}-{r.end - 1} does not cover them",
            )
        copies.append(Copy(key, lo, at, r.end - at))
        at = r.end
    return copies, None


def _plain(
    ids: list[int], a: int, c: int, saved: Callable[[str], tuple[int, int] | None]
) -> list[Copy] | str:
    """Copies for the plain tokens ``[a, c)`` (each sees every earlier token) before the second
    path of a block that starts at ``c``: the block's first path was generated in exactly
    ``ids[:c]``, and its closing request saved them."""
    key = seq_key(ids[:c])
    entry = saved(key)
    if entry is None or entry[0] > a or entry[1] < c:
        return f"tokens {a}-{c - 1} (before the path at {c}) are neither cached nor saved"
    return [Copy(key, a, a, c - a)]


class Entries:
    """The scheduler's book of saved sequences: key -> ``(from, n)`` (the tokens kept), least
    recently used first, at most ``max_tokens`` tokens in all. The worker holds the K/V; every
    key this book drops is returned, for the worker to free."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.items: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.used = 0

    def get(self, key: str) -> tuple[int, int] | None:
        return self.items.get(key)

    def touch(self, key: str) -> None:
        self.items.move_to_end(key)

    def add(self, key: str, start: int, n: int) -> tuple[bool, list[str], str | None]:
        """Keep ``key``'s tokens ``[start, n)``: ``(to save, evicted keys, why not)``; a key
        already kept is only touched; a sequence over the cap is refused, evicting nothing."""
        if n - start > self.max_tokens:
            return (
                False,
                [],
                f"path not saved: {n - start} tokens > the connector's cap max_tokens={self.max_tokens}",
            )
        if key in self.items:
            self.touch(key)
            return False, [], None
        evicted = []
        while self.items and self.used + n - start > self.max_tokens:
            old, (s0, n0) = self.items.popitem(last=False)
            self.used -= n0 - s0
            evicted.append(old)
        self.items[key] = (start, n)
        self.used += n - start
        return True, evicted, None

    def drop(self, keys: set[str]) -> list[str]:
        """Free ``keys`` (merged); returns those that were kept."""
        out = []
        for key in keys:
            got = self.items.pop(key, None)
            if got is not None:
                self.used -= got[1] - got[0]
                out.append(key)
        return out
