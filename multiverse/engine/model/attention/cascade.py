"""Cascade attention: a decode step whose sequences share K/V prefixes reads each prefix once.

Forked branches of one request attend the same long prefix. The plain fast path gathers that
prefix once per branch and layer; here each group of ``ForwardBatch.groups`` attends as ONE
sequence whose keys are its prefix followed by its members' own suffixes (the group's
``union``, padded to ``U`` slots) and whose ``M`` query rows are its members. The mask lets a
member's row see the prefix and its own suffix only, so the output equals per-sequence causal
attention over each ``kv_indices[i]`` (decode: the one new token sees all its keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from multiverse.engine.model.batch import ForwardBatch, check_forward_batch


@dataclass(slots=True)
class CascadePlan:
    """Shared-prefix decode attention over G groups of at most M members, unions of U keys."""

    groups: int
    members: int
    union_len: int
    gather: torch.Tensor  # [G * U] long (padding: slot 0, masked)
    mask: torch.Tensor  # Bool [G, 1, M, U]
    member_rows: torch.Tensor  # [G * M] long: sequence of each (group, member), padding -> 0
    seq_slot: torch.Tensor  # [N] long: flat (group, member) index of each sequence

    def attend(self, q: torch.Tensor, new_kv: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """q ``[N, Hq * D]``, pool ``[S, 2, Hk, D]`` -> ``[N, Hq * D]`` (``new_kv`` unused)."""
        return cascade_attention(q, pool, self)


def build_cascade_plan(batch: ForwardBatch) -> CascadePlan:
    """Validate ``batch`` (which must carry ``groups``) and build the cascade tensors."""
    if batch.groups is None:
        raise ValueError("cascade attention needs ForwardBatch.groups")
    check_forward_batch(batch)
    return build_cascade_tensors(batch)


def build_cascade_tensors(batch: ForwardBatch) -> CascadePlan:
    """The cascade tensors of a batch that passed :func:`check_forward_batch` with groups."""
    groups = batch.groups or []
    n = len(batch.q_lens)
    device = batch.input_ids.device
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


def cascade_attention(q: torch.Tensor, pool: torch.Tensor, plan: CascadePlan) -> torch.Tensor:
    """Decode attention with shared prefixes: q ``[N, Hq * D]``, pool ``[S, 2, Hk, D]`` ->
    ``[N, Hq * D]``. A group's prefix K/V is read once for all its members (one SDPA call per
    step and layer over the groups)."""
    hk, d = pool.shape[2], pool.shape[3]
    hq = q.shape[1] // d
    g, m, u = plan.groups, plan.members, plan.union_len
    kv = pool.index_select(0, plan.gather).view(g, u, 2, hk, d)  # [G, U, 2, Hk, D]
    k = kv[:, :, 0].transpose(1, 2)  # [G, Hk, U, D]
    v = kv[:, :, 1].transpose(1, 2)
    qg = q.index_select(0, plan.member_rows).view(g, m, hq, d).transpose(1, 2)  # [G, Hq, M, D]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(g * m, hq * d).index_select(0, plan.seq_slot)
