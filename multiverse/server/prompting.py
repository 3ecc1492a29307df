"""Which prompt a chat is sent with: the model's recorded SPEC 1.3 prompt format on the user turn.

The one rule for ``multiverse generate`` and ``multiverse serve`` (its chat endpoint):

  * the format is the one the model directory records,
    :func:`multiverse.train.summary.prompt_format` (``train_summary.json``: parallel for
    Multiverse models, sequential for autoregressive ones);
  * it is applied to the last user message with :func:`multiverse.format.prompts.user_prompt`,
    unless that message already ends with that suffix (then it goes as sent, not twice);
  * a model recording no format gets the messages as sent (a plain chat model is not told to
    think in parallel); so does ``--no-prompt-suffix``;
  * raw text (``generate --raw``, ``/v1/completions``) is never changed.

Plain Python (no fastapi): the commands import it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multiverse.format.prompts import prompt_suffix, user_prompt
from multiverse.train.summary import PromptFormat, prompt_format

__all__ = ["PromptFormat", "apply_prompt_format", "chat_prompt_format"]


def apply_prompt_format(messages: Sequence[dict[str, Any]], fmt: PromptFormat | None) -> list[dict[str, Any]]:
    """``messages`` with ``fmt``'s SPEC 1.3 suffix on the last user message (a copy; ``fmt``
    ``None``, no user message, or a message already ending with that suffix: unchanged)."""
    out = [dict(m) for m in messages]
    if fmt is None:
        return out
    for m in reversed(out):
        if m.get("role") == "user":
            content = str(m.get("content", ""))
            if not content.rstrip().endswith(prompt_suffix(fmt.parallel).strip()):
                m["content"] = user_prompt(content, parallel=fmt.parallel)
            break
    return out


def chat_prompt_format(model: str | Path, tokenizer: Any, suffix: bool = True) -> tuple[PromptFormat | None, str]:
    """The format chats to ``model`` (the directory holding ``train_summary.json``) get, and a
    line saying which (``suffix=False``: ``--no-prompt-suffix``, none).

    Raises ``ValueError`` naming the file when the record is invalid."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    template = "chat template" if has_template else "no chat template (plain rendering)"
    if not suffix:
        return None, f"prompt format: {template}, no suffix (--no-prompt-suffix)"
    fmt = prompt_format(model)
    if fmt is None:
        return None, (f"prompt format: {template}, no suffix ({model} records no prompt format in "
                      "train_summary.json; a Multiverse model may need the SPEC 1.3 suffix)")  # fmt: skip
    return fmt, f"prompt format: {template} + SPEC 1.3 {fmt.suffix} suffix ({fmt.source})"
