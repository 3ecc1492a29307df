"""Multiverse: natively parallel generation (Map / Process / Reduce).

The packages, bottom-up (each imports only those above it):

  - :mod:`multiverse.format`: the text format (tags, parser, validator), the layout rule
    (positions + Multiverse Attention masks), the SPEC 1.3 prompts and stop ids, tokenizers.
  - :mod:`multiverse.engine`: the fork/join inference engine (``LLM``, ``SamplingParams``).
  - :mod:`multiverse.train`: fine-tuning with Multiverse Attention on Hugging Face models.
  - :mod:`multiverse.eval`: synthetic tasks, benchmarks, grading, evaluation, structure statistics.
  - :mod:`multiverse.cli`: the ``multiverse`` commands (generate, serve, train, eval, inspect, demo).

Public entry points: ``multiverse.LLM``, ``multiverse.SamplingParams``, ``multiverse.grammar``
and ``multiverse.layout`` (``multiverse.attention`` is its old name). Heavy modules are
imported lazily so ``import multiverse`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__", "grammar", "layout", "attention"]

_MODULES = {
    "grammar": "multiverse.format.grammar",
    "layout": "multiverse.format.layout",
    "attention": "multiverse.format.layout",
}


def __getattr__(name: str):
    if name in ("LLM", "SamplingParams"):
        from multiverse.engine import llm as _llm

        return getattr(_llm, name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'multiverse' has no attribute {name!r}")
