"""The request policy both backends share: the local engine (:class:`~multiverse.engine.llm.LLM`)
and the fork/join driver over servers (:class:`multiverse.remote.RemoteLLM`).

  * :data:`DEFAULT_MAX_TOKENS`: the depth budget of a request that names none (the commands and
    the server);
  * :func:`pair_prompts`: the prompts of one ``generate`` call paired with their settings;
  * :func:`check_request`: the one validation of a request where it enters a backend (prompt
    ids, the settings object, the context and pool limits), each error naming what is wrong.

Plain Python (no torch): the driver imports it without the model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_MAX_TOKENS = 1024
"""Sequential-depth budget per answer when none is given, shared by ``eval``, ``generate``,
``serve``, the demo and the driver (the shipped tiny model needs up to ~300 with forking, its
autoregressive twin up to ~850). ``SamplingParams()`` alone still defaults to 256 (vLLM's
shape); the commands and the server pass this one."""


def pair_prompts(prompts: Any, sampling_params: Any = None) -> tuple[list[Any], list[Any]]:
    """``generate``'s arguments as two equal lists: one prompt (a string or a token-id list) or
    several, and one :class:`~multiverse.engine.sampling.SamplingParams` for all (default: the
    defaults) or one per prompt (``ValueError`` when the counts differ)."""
    from multiverse.engine.sampling import SamplingParams

    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    params = sampling_params or SamplingParams()
    plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
    return list(prompts), plist


def check_request(ids: Sequence[int], params: Any, *, vocab_size: int | None = None, context: int | None = None,
                  num_slots: int | None = None) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the problem unless ``ids`` (the prompt's token ids) and
    ``params`` (a :class:`~multiverse.engine.sampling.SamplingParams`) fit a backend with this
    vocabulary, context length and KV pool (``None``: not known, not checked)."""
    from multiverse.engine.sampling import SamplingParams

    if not ids:
        raise ValueError("empty prompt: give at least one token")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
        raise ValueError(
            f"prompt token id out of range [0, {vocab_size}): {[t for t in ids if not 0 <= t < vocab_size][:5]}"
        )
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if context and len(ids) > context:
        raise ValueError(
            f"prompt is {len(ids)} tokens, longer than the model's context ({context})"
        )
    if num_slots is not None and len(ids) >= num_slots:
        raise ValueError(
            f"prompt is {len(ids)} tokens, it does not fit the KV pool ({num_slots} slots)"
        )
    if context and params.max_tokens > context:
        raise ValueError(
            f"max_tokens ({params.max_tokens}) is larger than the model's context ({context})"
        )
