"""Fine-tuning causal LMs with Multiverse Attention (``multiverse train``).

  - :mod:`.data`: records (JSONL/Parquet) -> chat-rendered token ids with assistant-only labels;
    grammar check, curriculum order.
  - :mod:`.collate`: examples -> batches (packed or padded rows) with layout positions/ids.
  - :mod:`.masks`: a batch's layouts -> flex ``BlockMask`` / SDPA bool mask / eager float mask.
  - :mod:`.trainer`: ``TrainConfig``, ``train`` (Hugging Face ``Trainer`` underneath);
    :mod:`.arguments`: its ``TrainingArguments`` (warm-up as a share of the steps);
    :mod:`.loading`: model, tokenizer, device; :mod:`.output`: the output directory.
  - :mod:`.summary`: ``train_summary.json``, what a model directory was trained on (tasks,
    records, mode), read by ``multiverse eval`` and ``multiverse demo``.
  - :mod:`.presets`: tiny from-scratch Qwen2 configs for CPU work.

Heavy imports (transformers) happen on first use: ``from multiverse.train import train``.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str):
    if name in __all__:
        from multiverse.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'multiverse.train' has no attribute {name!r}")
