"""Exact Multiverse on an unmodified vLLM, through its plugin points (SPEC 4.1):

* the position hook (:mod:`.models`): Multiverse variants of Llama / Qwen2 / Qwen3 whose M-RoPE
  positions are the layout rule's;
* the KV connector (:mod:`.connector`): each path's K/V, saved when its closing request runs,
  supplied for the merged request's sibling paths so vLLM neither recomputes them nor lets them
  see each other.

Both or neither: each refuses to start without the other. ``register`` is the
``vllm.general_plugins`` entry point; ``python -m multiverse_vllm overrides MODEL_DIR`` and
``python -m multiverse_vllm transfer-config [MAX_TOKENS]`` print the two server arguments.
"""

from __future__ import annotations

from multiverse_vllm.config import ARCHITECTURES


def register() -> None:
    """Register the Multiverse architectures with vLLM (lazily: by module path)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"multiverse_vllm.models:{name}")
