"""Response bodies of the OpenAI-compatible endpoints, from the engine's ``RequestOutput`` s.

Each choice carries a ``multiverse`` object (depth tokens, # parallel, forced tokens, blocks,
branches, seconds, the branch tree of token ranges, the ``seed`` it ran with - sent back as
``seed`` with ``n=1`` it replays the choice - and ``forking``: ``on``, ``off`` or
``unavailable``, a model without the tags); the response's top-level ``multiverse`` is
that of the first choice. ``usage.completion_tokens`` counts the tokens of all branches (and of
all ``n`` choices); the prompt is counted once.
"""

from __future__ import annotations

from typing import Any

_LENGTH = ("length", "max_tokens", "max_total_tokens", "kv_capacity")


def finish_reason(out: Any) -> str:
    """OpenAI's ``stop`` / ``length``; ``abort`` and ``error`` are passed on as they are. Any
    other reason (``malformed``: the model broke the SPEC 1 grammar) is ``stop``: the engine's
    own reason is the ``multiverse.finish_reason`` field (streams: of the last chunk)."""
    reason = out.finish_reason
    if reason in _LENGTH:
        return "length"
    return reason if reason in ("abort", "error") else "stop"


def usage(outs: list[Any]) -> dict[str, Any]:
    prompt = outs[0].usage.prompt_tokens if outs else 0
    completion = sum(o.usage.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension(out: Any) -> dict[str, Any]:
    u = out.usage
    return {"depth_tokens": u.depth_tokens, "parallel_degree": round(u.parallel_degree, 4),
            "forced_tokens": u.forced_tokens, "blocks": u.blocks, "branches": u.branches,
            "seconds": round(u.seconds, 4), "finish_reason": out.finish_reason, "tree": out.tree,
            "seed": out.seed, "forking": out.forking,
            **({"error": out.error} if getattr(out, "error", None) else {})}  # fmt: skip


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([t], skip_special_tokens=False) for t in ids]


def completion_logprobs(tokenizer: Any, out: Any, with_stop: bool = False) -> dict[str, Any] | None:
    """Completions' ``logprobs`` object (the sampled token only; ``null`` for inserted tokens);
    ``with_stop``: the stop token that ended it too (aligned with :func:`token_ids`)."""
    if out.logprobs is None:
        return None
    ids, lps = list(out.token_ids), list(out.logprobs)
    if with_stop and out.ended_by is not None:
        ids.append(out.ended_by[0])
        lps.append(out.ended_by[1])
    pieces = _pieces(tokenizer, ids)
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    top = [{p: lp} if lp is not None else None for p, lp in zip(pieces, lps, strict=True)]
    return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def token_ids(out: Any) -> dict[str, Any]:
    """vLLM's ``return_token_ids`` fields: the output's token ids with the sampled token that
    ended it kept last (a stop id or EOS, as vLLM keeps it; the text leaves it out) and
    ``stop_reason``, that id when it was a stop."""
    ids = list(out.token_ids)
    stop = None
    if out.ended_by is not None:
        ids.append(out.ended_by[0])
        stop = out.ended_by[0] if out.finish_reason == "stop" else None
    return {"token_ids": ids, "stop_reason": stop}


def chat_logprobs(tokenizer: Any, out: Any, top: int | None) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    content = []
    for p, lp in zip(_pieces(tokenizer, out.token_ids), out.logprobs, strict=True):
        entry = {"token": p, "logprob": lp, "bytes": list(p.encode())}
        entry["top_logprobs"] = [dict(entry)] if top and lp is not None else []
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_body(head: dict[str, Any], outs: list[Any], tokenizer: Any, with_ids: bool = False) -> dict[str, Any]:
    choices = [{"index": i, "text": o.text, "finish_reason": finish_reason(o),
                "logprobs": completion_logprobs(tokenizer, o, with_ids), "multiverse": extension(o),
                **({**token_ids(o), "prompt_token_ids": list(o.prompt_token_ids)} if with_ids else {})}
               for i, o in enumerate(outs)]  # fmt: skip
    return {**head, "object": "text_completion", "choices": choices, "usage": usage(outs),
            "multiverse": choices[0]["multiverse"]}  # fmt: skip


def chat_body(head: dict[str, Any], outs: list[Any], tokenizer: Any, top: int | None) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                "finish_reason": finish_reason(o), "logprobs": chat_logprobs(tokenizer, o, top),
                "multiverse": extension(o)} for i, o in enumerate(outs)]  # fmt: skip
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(outs),
            "multiverse": choices[0]["multiverse"]}  # fmt: skip


def models_body(model_name: str, advert: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/models``: the one served model, with the fork/join driver's ``multiverse`` advert."""
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "multiverse", "multiverse": advert}]}  # fmt: skip
