"""Multiverse on the engines people deploy: a fork/join driver over any OpenAI-compatible
``/v1/completions`` server (vLLM, SGLang, llama.cpp, ``multiverse serve``), in token ids.

  * :class:`RemoteLLM`: ``RemoteLLM(base_url).generate(prompts, SamplingParams(...))``, the
    local ``LLM``'s interface and outputs (:class:`RemoteOutput` adds the merge mode, the HTTP
    requests and the server's prefix-cache hit rate) - :mod:`.driver`;
  * the rules are the engine's own, driven by the server's tokens - :mod:`.tree`;
  * what a server offers (merge modes, tokenizer, tags, EOS, context) - :mod:`.info`;
  * the HTTP (connection reuse, a concurrency limit, retries, cancellation) - :mod:`.transport`.

A library layer beside the engine: it imports ``format`` and ``engine`` (never ``server`` or
``cli``); httpx and tenacity come with the ``remote`` extra.
"""

from multiverse.remote.driver import RemoteLLM, RemoteOutput
from multiverse.remote.info import MERGE_MODES, ServerInfo, choose_merge, discover
from multiverse.remote.transport import RemoteError

__all__ = [
    "MERGE_MODES",
    "RemoteError",
    "RemoteLLM",
    "RemoteOutput",
    "ServerInfo",
    "choose_merge",
    "discover",
]
