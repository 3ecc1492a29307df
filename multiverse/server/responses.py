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


def completion_logprobs(tokenizer: Any, out: Any) -> dict[str, Any] | None:
    """Completions' ``logprobs`` object (the sampled token only; ``null`` for inserted tokens)."""
    if out.logprobs is None:
        return None
    pieces = _pieces(tokenizer, out.token_ids)
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    top = [{p: lp} if lp is not None else None for p, lp in zip(pieces, out.logprobs, strict=True)]
    return {"tokens": pieces, "token_logprobs": list(out.logprobs), "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, out: Any, top: int | None) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    content = []
    for p, lp in zip(_pieces(tokenizer, out.token_ids), out.logprobs, strict=True):
        entry = {"token": p, "logprob": lp, "bytes": list(p.encode())}
        entry["top_logprobs"] = [dict(entry)] if top and lp is not None else []
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_body(head: dict[str, Any], outs: list[Any], tokenizer: Any) -> dict[str, Any]:
    choices = [{"index": i, "text": o.text, "finish_reason": finish_reason(o),
                "logprobs": completion_logprobs(tokenizer, o), "multiverse": extension(o)}
               for i, o in enumerate(outs)]  # fmt: skip
    return {**head, "object": "text_completion", "choices": choices, "usage": usage(outs),
            "multiverse": choices[0]["multiverse"]}  # fmt: skip


def chat_body(head: dict[str, Any], outs: list[Any], tokenizer: Any, top: int | None) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                "finish_reason": finish_reason(o), "logprobs": chat_logprobs(tokenizer, o, top),
                "multiverse": extension(o)} for i, o in enumerate(outs)]  # fmt: skip
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(outs),
            "multiverse": choices[0]["multiverse"]}  # fmt: skip
