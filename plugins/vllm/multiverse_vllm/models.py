"""The position hook: Multiverse variants of vLLM's Llama, Qwen2 and Qwen3 that implement the
M-RoPE interface (``SupportsMRoPE.get_mrope_input_positions``). vLLM asks it once per request for
the prompt's positions and then places generated token ``i`` at ``i + delta``
(``v1/worker/gpu_model_runner.py``: ``_init_mrope_positions``, ``_calc_mrope_positions``; the CPU
runner subclasses that runner). The answer is the layout rule's positions in three equal rows,
which M-RoPE turns into plain RoPE (:func:`multiverse_vllm.plan.layout_positions`).

vLLM calls the hook only when the config declares M-RoPE (``rope_parameters.mrope_section``) and
the architecture is one of these: ``python -m multiverse_vllm overrides MODEL_DIR`` prints the
``--hf-overrides`` that say both. The hook alone is further from exact than a flat merge, so the
model refuses to start without the Multiverse KV connector (:mod:`multiverse_vllm.connector`).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from multiverse_vllm.config import check_connector, model_tag_ids
from multiverse_vllm.plan import layout_positions

__all__ = ["MultiverseLlamaForCausalLM", "MultiverseQwen2ForCausalLM", "MultiverseQwen3ForCausalLM"]


class _LayoutPositions:
    """The hook, mixed into a causal LM of vLLM (before it in the bases)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        check_connector(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._mv_tag_ids = model_tag_ids(vllm_config.model_config)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:  # fmt: skip
        if mm_features:
            raise ValueError("Multiverse models take text only")
        return layout_positions(input_tokens, self._mv_tag_ids)


class MultiverseLlamaForCausalLM(_LayoutPositions, LlamaForCausalLM, SupportsMRoPE):
    pass


class MultiverseQwen2ForCausalLM(_LayoutPositions, Qwen2ForCausalLM, SupportsMRoPE):
    pass


class MultiverseQwen3ForCausalLM(_LayoutPositions, Qwen3ForCausalLM, SupportsMRoPE):
    pass
