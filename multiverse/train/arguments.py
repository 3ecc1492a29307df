"""The ``TrainingArguments`` of ``multiverse train`` (imports transformers on import).

A module of its own so the class pickles by name (the Trainer saves its arguments as
``training_args.bin`` in every checkpoint) while :mod:`multiverse.train.trainer` keeps
transformers out of its import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import TrainingArguments


def warmup_steps(warmup_ratio: float, num_training_steps: int) -> int:
    """Warm-up steps of a run: ``ceil(warmup_ratio * num_training_steps)`` (a product that is
    an integer up to float rounding, e.g. 0.07 * 100, is not rounded up)."""
    return max(0, math.ceil(warmup_ratio * num_training_steps - 1e-9))


@dataclass
class MultiverseTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose warm-up is a share of the run's optimizer steps
    (``warmup_ratio``, any value in [0, 1], :func:`warmup_steps`); the stock ``warmup_steps``
    (an integer step count, or a ratio only below 1) is not used."""

    warmup_ratio: float = 0.0

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return warmup_steps(self.warmup_ratio, num_training_steps)
