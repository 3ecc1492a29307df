"""The only place a step's tensors are built: scheduled work -> ForwardBatch -> logits.

Per branch the K/V list handed to the model is
  * ``branch.attend`` (already extended by the new slots) with the causal rule, in the common
    case: a decode step, a prompt without Multiverse structure, the tokens the engine inserts;
  * all of ``branch.kv`` with a Bool mask from :meth:`multiverse.attention.Layout.dense_mask`
    (only the chunk's rows) when the chunk holds a token whose membership changes (a prompt with
    earlier parallel answers, a sequential block after a refused fork, a recomputation after
    preemption). The positions the branch recorded are checked against the layout on the way,
    and ``branch.attend`` is reset to what the chunk's last token may see.

A per-branch tensor mirror of ``attend`` grows in place between steps, so a decode step does not
rebuild an ``O(context)`` index tensor per branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multiverse.engine.model import CausalLM, ForwardBatch, KVPool
from multiverse.engine.scheduler import Work
from multiverse.engine.sequence import Branch


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


class ModelRunner:
    def __init__(self, model: CausalLM, num_slots: int) -> None:
        self.model = model
        self.device = model.device
        self.pool = KVPool.for_model(model, num_slots)
        self._mirrors: dict[tuple[int, int], _Mirror] = {}

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

    def _masked(self, w: Work) -> tuple[torch.Tensor, torch.Tensor]:
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
        br.attend = [kv[j] for j in mask[-1].nonzero()[:, 0].tolist()]
        br.attend_version += 1
        return torch.tensor(kv, dtype=torch.long, device=self.device), mask.to(self.device)

    @torch.inference_mode()
    def run(self, works: list[Work]) -> StepOutput:
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        kv_indices, masks, q_lens = [], [], []
        rows: list[int] = []
        sample_row: list[int | None] = []
        prompt_rows: list[list[int]] = []
        offset = 0
        for w in works:
            br = w.branch
            ids += br.own_ids[w.start : w.start + w.count]
            pos += br.own_pos[w.start : w.start + w.count]
            slots += w.slots
            if w.masked:
                kvt, mask = self._masked(w)
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

        batch = ForwardBatch(t(ids), t(pos), t(slots), q_lens, kv_indices, masks,
                             t(rows) if rows else t([offset - 1]))  # fmt: skip
        logits = self.model(batch, self.pool)
        return StepOutput(logits, sample_row, prompt_rows)
