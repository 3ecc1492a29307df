"""Batches for training: ids, layout positions, shifted labels, per-row layouts.

Positions and masks come ONLY from :mod:`multiverse.format.layout` (:func:`~multiverse.format.layout.layout`
per example, :func:`~multiverse.format.layout.pack` for a packed row); this module never looks at
tags itself. The attention mask is not built here: the batch carries each row's
:class:`~multiverse.format.layout.Layout` (per-token ids, O(n) memory) and the trainer turns them
into a BlockMask or a small boolean mask on the model's device (:mod:`multiverse.train.masks`).

Invariants of a batch ``b`` with ``B`` rows of ``n`` tokens:
  * ``b["input_ids"]``, ``b["position_ids"]``, ``b["labels"]``, ``b["shift_labels"]``: LongTensor[B, n].
  * ``b["layouts"]``: tuple of B layouts; ``b["position_ids"][r] == b["layouts"][r].position_ids``.
  * ``shift_labels[r, t]`` is the target of the prediction made at token ``t``: the label of
    token ``t + 1`` when it belongs to the same example, else -100. So the last token of an
    example never predicts the first token of the next one, and pads never count.
  * Packed (``pack=True``): the B examples share ONE row, in order, positions restarting per
    example, no attention across examples; the row is padded at the end (a separate pad
    document) to a multiple of ``pad_to_multiple_of``. Unpacked: one example per row, padded
    at the end to the longest row; pads come after every real token, so causality alone
    keeps real tokens from seeing them.
  Both give the same loss: the same tokens, the same positions, the same visibility.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from multiverse.format import layout as attention
from multiverse.train.data import IGNORE_INDEX, Example


@dataclass(slots=True)
class MultiverseCollator:
    """Turns a list of :class:`~multiverse.train.data.Example` into a training batch."""

    tag_ids: Mapping[str, int]
    pad_id: int
    pack: bool = True
    pad_to_multiple_of: int = 1

    def __call__(self, examples: Sequence[Example]) -> dict[str, object]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        if self.pack:
            return self._packed(examples)
        return self._rows(examples)

    def _packed(self, examples: Sequence[Example]) -> dict[str, object]:
        ids: list[int] = []
        labels: list[int] = []
        shift: list[int] = []
        layouts = []
        for ex in examples:
            ids.extend(ex.input_ids)
            labels.extend(ex.labels)
            shift.extend(shifted(ex.labels))
            layouts.append(attention.layout(ex.input_ids, self.tag_ids))
        pad = _pad_length(len(ids), self.pad_to_multiple_of)
        if pad:
            tail = [self.pad_id] * pad
            ids.extend(tail)
            labels.extend([IGNORE_INDEX] * pad)
            shift.extend([IGNORE_INDEX] * pad)
            layouts.append(attention.layout(tail, self.tag_ids))
        row = attention.pack(layouts)
        return _batch([ids], [labels], [shift], [row])

    def _rows(self, examples: Sequence[Example]) -> dict[str, object]:
        n = max(len(ex) for ex in examples)
        n += _pad_length(n, self.pad_to_multiple_of)
        ids, labels, shift, layouts = [], [], [], []
        for ex in examples:
            pad = n - len(ex)
            row_ids = list(ex.input_ids) + [self.pad_id] * pad
            ids.append(row_ids)
            labels.append(list(ex.labels) + [IGNORE_INDEX] * pad)
            shift.append(shifted(ex.labels) + [IGNORE_INDEX] * pad)
            layouts.append(attention.layout(row_ids, self.tag_ids))
        return _batch(ids, labels, shift, layouts)


def shifted(labels: Sequence[int]) -> list[int]:
    """Targets per prediction within one example: ``labels[1:] + [-100]``."""
    return list(labels[1:]) + [IGNORE_INDEX]


def _pad_length(n: int, multiple: int) -> int:
    return (-n) % multiple if multiple > 1 else 0


def _batch(ids, labels, shift, layouts) -> dict[str, object]:
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),  # [B, n]
        "position_ids": torch.stack([lay.position_ids for lay in layouts]),  # [B, n]
        "labels": torch.tensor(labels, dtype=torch.long),  # [B, n]
        "shift_labels": torch.tensor(shift, dtype=torch.long),  # [B, n]
        "layouts": tuple(layouts),
    }
