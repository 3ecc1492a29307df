"""The Multiverse Curator (SPEC section 5): sequential reasoning chains -> Multiverse data.

The LLM does only what needs judgement (a step tree over unit ranges, which sibling steps are
independent, outlines / conclusions / small edits per block); the structure is built and every
original unit is refilled in code, so nothing is dropped or re-typed.

Modules, bottom up: :mod:`units` (numbered units + normalisation), :mod:`plan` (the reply
types), :mod:`validate` (JSON extraction and the validators), :mod:`skeleton` (the block tree
from a plan), :mod:`refill` (units into the skeleton, edits, canonical text), :mod:`checks`
(grammar, content, style), :mod:`prompts`, :mod:`journal`, :mod:`client` (OpenAI-compatible,
httpx, retries), :mod:`pipeline` (one record, a whole run), :mod:`report`.

This package never imports :mod:`multiverse.cli`; ``httpx`` and ``rapidfuzz`` are imported
lazily by the modules that need them.
"""
