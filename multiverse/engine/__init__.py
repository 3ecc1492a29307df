"""The fork/join inference engine (SPEC section 4): ``LLM(path).generate(prompts, SamplingParams(...))``.

Plain-Python bookkeeping, then tensors, in reading order:

  - :mod:`.request`: ``Request`` / ``Branch`` state and every transition on it; ``check_invariants``
    (the read-only checks are :mod:`.invariants`, the merged-path records :mod:`.records`).
  - :mod:`.kv_manager`: the token-granular KV slot pool with reference counts (never imports torch).
  - :mod:`.radix`: the prefix cache (prompts and finished outputs) over those slots.
  - :mod:`.scheduler`: which branches run in the next step, with how many tokens, in which slots.
  - :mod:`.forkjoin`: Map / Reduce: fork at ``</Goal>``, path ends, the zero-copy merge, budgets.
  - :mod:`.sampling`: ``SamplingParams`` and the batched sampler.
  - :mod:`.runner`: the only place a step's tensors are built (``ModelRunner.run``).
  - :mod:`.model`: our own forward (``CausalLM``) over the KV pool, with attention backends.
  - :mod:`.loader`: a local Hugging Face directory or a GGUF file into a ``CausalLM``.
  - :mod:`.adapter`: a base plus a PEFT LoRA adapter directory, merged at load; the base as a
    transformers model (``load_hf_model``, also the GGUF path's and the trainer's).
  - :mod:`.llm`: the public ``LLM``: one step = schedule, run, postprocess; ``abort``; an
    exception in one request's processing finishes that request (``finish_reason="error"``).
  - :mod:`.outputs`: ``RequestOutput`` / ``Usage`` built from a finished request.

The engine imports ``multiverse.format`` (the layout rule, the grammar, the prompts) and nothing
from ``multiverse.train``, ``multiverse.eval`` or ``multiverse.cli``.
"""
