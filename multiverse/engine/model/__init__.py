"""The engine's tensor side: our own forward pass for Qwen2/Qwen2.5, Llama and Qwen3 checkpoints.

The engine never runs a transformers model. It runs :class:`CausalLM`, a small re-implementation
of the decoder (RMSNorm, RoPE with caller-given position ids, GQA attention, SiLU MLP) that reads
the K/V of every sequence out of one preallocated token-granular :class:`KVPool`.

Modules, in reading order:

- :mod:`.spec`: :class:`ModelSpec` (what the forward needs from an HF config), dtype names.
- :mod:`.rope`: RoPE frequencies and the interleaved layout q/k heads are stored in.
- :mod:`.batch`: :class:`ForwardBatch`, the contract of one engine step, and its validation.
- :mod:`.kv_pool`: :class:`KVPool`, the K/V storage shared by all sequences.
- :mod:`.attention`: the attention backend interface and its backends (reference, sdpa,
  cascade), each fast one tested against the reference.
- :mod:`.layer`: one decoder layer's parameters (fused projections) and non-attention math.
- :mod:`.weights`: Hugging Face tensor names -> our parameters.
- :mod:`.causal_lm`: :class:`CausalLM` and its forwards (``forward``, ``step``, ``forward_full``).

Everything other code uses is importable from here.
"""

from multiverse.engine.model.attention import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    AttentionMetadata,
    AttentionPlan,
    CascadePlan,
    ReferencePlan,
    build_attention_plan,
    build_cascade_plan,
    build_reference_plan,
    cascade_attention,
    causal_mask,
    reference_attention,
)
from multiverse.engine.model.batch import ForwardBatch, check_forward_batch
from multiverse.engine.model.causal_lm import CausalLM
from multiverse.engine.model.kv_pool import KVPool
from multiverse.engine.model.layer import LayerWeights
from multiverse.engine.model.rope import rope_inv_freq
from multiverse.engine.model.spec import SUPPORTED_MODEL_TYPES, ModelSpec, resolve_dtype

__all__ = [
    "ATTENTION_BACKENDS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionPlan",
    "CascadePlan",
    "CausalLM",
    "ForwardBatch",
    "KVPool",
    "LayerWeights",
    "ModelSpec",
    "ReferencePlan",
    "build_attention_plan",
    "build_cascade_plan",
    "build_reference_plan",
    "cascade_attention",
    "causal_mask",
    "check_forward_batch",
    "reference_attention",
    "resolve_dtype",
    "rope_inv_freq",
]
