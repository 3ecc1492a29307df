"""The request policy every backend and command shares: the local engine
(:class:`~multiverse.engine.llm.LLM`), the fork/join driver over servers
(:class:`multiverse.remote.RemoteLLM`), both servers, ``generate``, ``eval`` and the demo.

  * :data:`DEFAULT_MAX_TOKENS`: the depth budget of a request that names none (defined with
    :class:`~multiverse.engine.sampling.SamplingParams`, whose default it is);
  * :func:`end_ids`: the ids that end an answer unless ``ignore_eos`` (EOS, the chat turn end),
    the one rule a backend's ``eos_token_ids`` come from: callers add no stop ids of their own;
  * :func:`check_chat` / :func:`chat_conversations`: the one validation of a chat (what
    ``LLM.chat``, ``RemoteLLM.chat`` and ``/v1/chat/completions`` take), each error naming the
    message and field;
  * :func:`pair_prompts`: the prompts of one ``generate`` call paired with their settings;
  * :func:`check_request`: the one validation of a request where it enters a backend (prompt
    ids, the settings object, the context and pool limits), each error naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from multiverse.engine.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from multiverse.format.prompts import stop_token_ids

__all__ = ["CHAT_ROLES", "DEFAULT_MAX_TOKENS", "chat_conversations", "check_chat", "check_request",
           "end_ids", "pair_prompts"]  # fmt: skip

CHAT_ROLES = ("system", "developer", "user", "assistant")
"""The roles a chat message may have (``developer`` is sent to the template as ``system``)."""


def end_ids(tokenizer: Any, extra: Iterable[int] = ()) -> frozenset[int]:
    """The token ids that end an answer (a branch; ``SamplingParams.ignore_eos`` turns them off):
    the tokenizer's EOS, the chat turn end ``<|im_end|>`` and ``<|endoftext|>`` where the
    vocabulary has them (:func:`~multiverse.format.prompts.stop_token_ids`), and ``extra`` (a
    checkpoint's ``generation_config.json`` EOS ids, those a server advertises)."""
    ids = {int(t) for t in extra} | set(stop_token_ids(tokenizer))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def check_chat(messages: Any) -> list[dict[str, str]]:
    """``messages`` as the chat template takes them, or ``ValueError`` naming the message and
    field at fault: a non-empty list of ``{"role", "content"}`` objects, ``role`` one of
    :data:`CHAT_ROLES`, ``content`` a string or a list of ``{"type": "text", "text"}`` parts
    (joined) of valid Unicode text, left out only by an assistant message. Other keys (``name``)
    are ignored; ``developer`` becomes ``system``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: give a non-empty list of messages ({role, content} objects)")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{at}: a message is a {{role, content}} object, got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"{at}.role: must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), role, f"{at}.content")})  # fmt: skip
    return out


def _content(content: Any, role: str, at: str) -> str:
    if content is None:
        if role != "assistant":
            raise ValueError(f"{at}: a {role} message needs its content")
        return ""
    if isinstance(content, (list, tuple)):
        texts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{at}[{k}]: only text parts ({{type: text, text}}) are taken, got {kind!r}")
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise ValueError(f"{at}: must be a string or a list of text parts, got {type(content).__name__}")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{at}: not valid Unicode text: a lone surrogate {content[e.start]!r} at character "
                         f"{e.start}") from None  # fmt: skip
    return content


def chat_conversations(messages: Any) -> list[list[dict[str, str]]]:
    """``chat``'s argument, one conversation (a list of messages) or several (a list of such
    lists), as checked conversations (:func:`check_chat`)."""
    if isinstance(messages, (list, tuple)) and messages and all(isinstance(c, (list, tuple)) for c in messages):
        return [check_chat(c) for c in messages]
    return [check_chat(messages)]


def pair_prompts(prompts: Any, sampling_params: Any = None) -> tuple[list[Any], list[Any]]:
    """``generate``'s arguments as two equal lists: one prompt (a string or a token-id list) or
    several, and one :class:`~multiverse.engine.sampling.SamplingParams` for all (default: the
    defaults) or one per prompt (``ValueError`` when the counts differ)."""
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
