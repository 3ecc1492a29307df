"""Multiverse: natively parallel generation (Map / Process / Reduce).

Public entry points:
  - ``multiverse.grammar``: the tags, the parser/validator/tolerant reader, flatten, tokenizer tags.
  - ``multiverse.attention``: the canonical layout rule (positions + Multiverse Attention masks).
  - ``multiverse.LLM`` / ``multiverse.SamplingParams``: the fork/join inference engine.

Heavy modules are imported lazily so ``import multiverse`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in ("LLM", "SamplingParams"):
        from multiverse.engine import llm as _llm

        return getattr(_llm, name)
    raise AttributeError(f"module 'multiverse' has no attribute {name!r}")
