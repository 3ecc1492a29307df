"""The only place a step's tensors are built: scheduled work -> ForwardBatch -> logits.

Per branch the K/V list handed to the model is
  * ``branch.attend`` (already extended by the new slots) with the causal rule, in the common
    case: a decode step, a prompt without Multiverse structure, the tokens the engine inserts;
  * all of ``branch.kv`` with a Bool mask from :meth:`multiverse.format.layout.Layout.dense_mask`
    (only the chunk's rows) when the chunk holds a token whose membership changes (a prompt with
    earlier parallel answers, a sequential block after a refused fork, a recomputation after
    preemption). The positions the branch recorded are checked against the layout on the way,
    and the step's output carries what the chunk's last token may see
    (``StepOutput.attend_updates``), for the engine to set as ``branch.attend``.

The runner only reads branch state; it writes none.

A per-branch tensor mirror of ``attend`` grows in place between steps, so a decode step does not
rebuild an ``O(context)`` index tensor per branch. On CPU, a decode step whose siblings share a
long prefix also hands the model ``ForwardBatch.groups`` (cascade attention: a family's prefix
K/V read once per layer, not once per branch); the logits are the same.

With ``static_decode`` (default: on CUDA, where it is captured as CUDA graphs), a plain decode
step (every work one unmasked token that samples) runs as a replay of a fixed-shape step
(:class:`~multiverse.engine.model.graphs.DecodeGraphs`): the pool gets one extra *scratch* slot
that the allocator never hands out, for the padding rows; a branch's K/V list goes in as its
mirror plus the few slots appended since the mirror was last filled (at most
``TAIL_FLUSH``), packed with the step's ids, positions, slots and lengths into one
host-to-device copy. Prefill, masked chunks, cascade steps, anything over the largest bucket
(capped at what the pool and ``max_step_rows`` let a step hold) and the steps of a bucket whose
capture failed run eagerly, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from multiverse.engine.model import CausalLM, ForwardBatch, KVPool
from multiverse.engine.model.graphs import Capturer, DecodeGraphs, bucket_limits
from multiverse.engine.request import Branch
from multiverse.engine.scheduler import Work


@dataclass(slots=True)
class _Mirror:
    version: int
    length: int
    buffer: torch.Tensor  # [capacity] long


@dataclass(slots=True)
class StepOutput:
    logits: torch.Tensor  # [rows, vocab] float32
    sample_row: list[int | None]  # per work: row of its last token's logits (if it completes)
    prompt_rows: list[list[int]]  # per work: rows for the prompt logprobs of work.prompt_rows
    attend_updates: dict[int, list[int]] = field(default_factory=dict)  # work -> its new attend (masked)


CASCADE_MIN_SAVED_ROWS = 1024
"""Group siblings only when that saves this many gathered K/V rows per layer. Measured with
``benchmarks/cascade.py`` (shipped tiny model, 2-core CPU, one thread, forking on), for the SDPA
cascade: one request with six branches (~750 rows saved) gains nothing (0.99x with every family
grouped), eight requests 1.07-1.13x, sixteen 1.19-1.23x. With the one-pass CPU kernel (groups
are its shared-prefix segments) sixteen requests ran 0.97x (4.21 s ungrouped, 4.33 s grouped;
the SDPA cascade 5.25 s, the earlier two-pass kernel ungrouped 5.35 s; 2026-12-07)."""

TAIL_FLUSH = 32
"""A static decode step sends a branch's slots appended since its mirror was filled with the
step's one host-to-device copy; past this many, the mirror is filled (one copy, every
``TAIL_FLUSH`` steps of a branch)."""


class ModelRunner:
    def __init__(self, model: CausalLM, num_slots: int, *, static_decode: bool = False,
                 capturer: Capturer | None = None, graph_max_batch: int | None = None,
                 graph_max_kv: int | None = None, max_step_rows: int | None = None) -> None:  # fmt: skip
        self.model = model
        self.device = model.device
        # static decoding: one more pool slot, the scratch slot padding rows write (never allocated)
        self.pool = KVPool.for_model(model, num_slots + (1 if static_decode else 0))
        self._mirrors: dict[tuple[int, int], _Mirror] = {}
        # shared-prefix decode attention (ForwardBatch.groups); default: on CPU, where the
        # per-branch gather of a shared prefix is a large part of a forked decode step
        self.cascade = self.device.type == "cpu"
        self.cascade_min_saved_rows = CASCADE_MIN_SAVED_ROWS
        self.cascade_steps = 0  # decode steps that ran with groups (for tests and profiling)
        self.graphs: DecodeGraphs | None = None
        if static_decode:  # buckets no larger than a step can fill (max_step_rows: the scheduler's budget)
            max_batch, max_kv = bucket_limits(num_slots, max_step_rows or num_slots, graph_max_batch, graph_max_kv)
            self.graphs = DecodeGraphs(model, self.pool.kv, scratch_slot=num_slots, capturer=capturer,
                                       max_batch=max_batch, max_kv=max_kv)  # fmt: skip
        self.static_steps = 0  # decode steps that ran as a replay of a static step

    def forget(self, br: Branch) -> None:
        self._mirrors.pop((br.request.id, br.id), None)

    def _attend_tensor(self, br: Branch) -> torch.Tensor:
        att = br.attend
        key = (br.request.id, br.id)
        m = self._mirrors.get(key)
        if m is None or m.version != br.attend_version or m.length > len(att):
            cap = max(64, 2 * len(att))
            m = _Mirror(br.attend_version, 0, torch.empty(cap, dtype=torch.long, device=self.device))
            self._mirrors[key] = m
        if len(att) > m.buffer.shape[0]:
            grown = torch.empty(2 * len(att), dtype=torch.long, device=self.device)
            grown[: m.length] = m.buffer[: m.length]
            m.buffer = grown
        if len(att) > m.length:
            m.buffer[m.length : len(att)] = torch.tensor(att[m.length :], dtype=torch.long)
            m.length = len(att)
        return m.buffer[: len(att)]

    def _attend_parts(self, br: Branch) -> list[torch.Tensor | list[int]]:
        """A branch's K/V slot list as its mirror's filled part plus the slots appended since
        (a host list, at most ``TAIL_FLUSH`` long), for :meth:`DecodeGraphs.run`."""
        att = br.attend
        m = self._mirrors.get((br.request.id, br.id))
        if m is None or m.version != br.attend_version or m.length > len(att) or len(att) - m.length > TAIL_FLUSH:
            return [self._attend_tensor(br)]
        tail = att[m.length :]
        return [m.buffer[: m.length], tail] if tail else [m.buffer[: m.length]]

    def _static_decode(self, works: list[Work]) -> StepOutput | None:
        """The step as a replay of a fixed-shape decode step, or None (run it eagerly)."""
        assert self.graphs is not None
        rows = [(w.branch.own_ids[w.start], w.branch.own_pos[w.start], w.slots[0]) for w in works]
        logits = self.graphs.run(rows, [self._attend_parts(w.branch) for w in works])
        if logits is None:
            return None
        self.static_steps += 1
        return StepOutput(logits, list(range(len(works))), [[] for _ in works])

    def _masked(self, w: Work) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """K/V indices (all of the branch's ``kv`` up to the chunk's end), the chunk's rows of
        the layout mask, and the slots the chunk's last token attends (the new ``attend``)."""
        br = w.branch
        lo = br.prefix_len + w.start
        hi = lo + w.count
        lay = br.layout(hi)
        expect = lay.position_ids[lo:hi].tolist()
        if expect != br.own_pos[w.start : w.start + w.count]:
            raise RuntimeError(
                f"engine positions {br.own_pos[w.start : w.start + w.count]} disagree with the "
                f"layout rule {expect} at tokens {lo}..{hi} of request {br.request.id}"
            )
        mask = lay.dense_mask(rows=slice(lo, hi))[:, :hi]  # [count, hi] bool
        kv = br.kv[:hi]
        attend = [kv[j] for j in mask[-1].nonzero()[:, 0].tolist()]
        return torch.tensor(kv, dtype=torch.long, device=self.device), mask.to(self.device), attend

    @torch.inference_mode()
    def run(self, works: list[Work]) -> StepOutput:
        decode = all(w.count == 1 and not w.masked for w in works)
        groups = None
        if decode and self.cascade:
            kv_plain = [self._attend_tensor(w.branch) for w in works]
            groups = self._groups(works, kv_plain, self.cascade_min_saved_rows)
        if self.graphs is not None and decode and groups is None and all(
                w.completes and not w.prompt_rows for w in works):  # fmt: skip
            out = self._static_decode(works)
            if out is not None:
                return out
        return self._eager(works, groups)

    def _eager(self, works: list[Work], groups: list[tuple[torch.Tensor, list[int]]] | None) -> StepOutput:
        """The step through ``CausalLM.forward`` (``groups``: the decode step's cascade groups)."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        kv_indices, masks, q_lens = [], [], []
        rows: list[int] = []
        sample_row: list[int | None] = []
        prompt_rows: list[list[int]] = []
        attend_updates: dict[int, list[int]] = {}
        offset = 0
        for i, w in enumerate(works):
            br = w.branch
            ids += br.own_ids[w.start : w.start + w.count]
            pos += br.own_pos[w.start : w.start + w.count]
            slots += w.slots
            if w.masked:
                kvt, mask, attend_updates[i] = self._masked(w)
            else:
                kvt, mask = self._attend_tensor(br), None
            kv_indices.append(kvt)
            masks.append(mask)
            q_lens.append(w.count)
            prompt_rows.append(list(range(len(rows), len(rows) + len(w.prompt_rows))))
            rows += [offset + r for r in w.prompt_rows]
            if w.completes:
                sample_row.append(len(rows))
                rows.append(offset + w.count - 1)
            else:
                sample_row.append(None)
            offset += w.count

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=self.device)

        self.cascade_steps += groups is not None
        batch = ForwardBatch(t(ids), t(pos), t(slots), q_lens, kv_indices, masks,
                             t(rows) if rows else t([offset - 1]), groups)  # fmt: skip
        logits = self.model(batch, self.pool)
        return StepOutput(logits, sample_row, prompt_rows, attend_updates)

    @staticmethod
    def _groups(
        works: list[Work], kv_indices: list[torch.Tensor], min_saved_rows: int = 0
    ) -> list[tuple[torch.Tensor, list[int]]] | None:
        """Sibling branches decoding in this step, grouped with the K/V prefix they share (the
        parent's visible K/V at the fork), for cascade attention. None unless every work is
        one unmasked token and grouping saves at least ``min_saved_rows`` gathered K/V rows.
        A family whose lists do not agree on the shared part is split into one-member groups
        (never wrong, only slower)."""
        if any(w.count != 1 or w.masked for w in works):
            return None
        families: dict[tuple[int, int, int], list[int]] = {}
        solos: list[int] = []
        for i, w in enumerate(works):
            br = w.branch
            if br.parent is None:
                solos.append(i)
            else:
                families.setdefault((id(br.request), id(br.parent), br.prefix_len), []).append(i)
        groups: list[tuple[torch.Tensor, list[int]]] = []
        for members in families.values():
            shared = {len(kv_indices[i]) - (len(works[i].branch.kv) - works[i].branch.prefix_len)
                      for i in members}  # fmt: skip
            first = kv_indices[members[0]]
            a = next(iter(shared))
            if (len(members) < 2 or len(shared) != 1 or a < 1
                    or not all(torch.equal(kv_indices[i][:a], first[:a]) for i in members[1:])):  # fmt: skip
                solos.extend(members)
                continue
            groups.append((first[:a], members))
        saved = sum((len(members) - 1) * len(prefix) for prefix, members in groups)
        if not groups or saved < max(1, min_saved_rows):
            return None
        groups.extend((kv_indices[i][:-1], [i]) for i in solos)
        return groups
