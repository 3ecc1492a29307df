"""The SPEC 1.3 prompt and answer format: the one place a chat is rendered to text.

Trainer, evaluation, synthetic tasks, the demo, the server and ``multiverse generate`` all call
these functions; nothing else calls ``apply_chat_template`` or appends a prompt suffix.

  * user turn = question + :data:`PROMPT_SUFFIX_PARALLEL` (sequential/AR data:
    :data:`PROMPT_SUFFIX_SEQUENTIAL`);
  * assistant turn = the chain + :data:`ANSWER_PREFIX` + the answer;
  * a chat is rendered with the tokenizer's chat template; a tokenizer without one gets the
    plain rendering (each message's content followed by ``"\\n"``, no generation prompt), the
    same for training and inference;
  * an answer ends at EOS or at one of :func:`stop_token_ids` (the chat turn end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_SUFFIX_PARALLEL = " Think step by step and in parallel before answering."
PROMPT_SUFFIX_SEQUENTIAL = " Think step by step before answering."
ANSWER_PREFIX = "\n\nAnswer: "
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
"""Tokens that end an answer besides the tokenizer's EOS, where the vocabulary has them."""

Message = dict[str, str]


def prompt_suffix(parallel: bool = True) -> str:
    return PROMPT_SUFFIX_PARALLEL if parallel else PROMPT_SUFFIX_SEQUENTIAL


def user_prompt(question: str, parallel: bool = True) -> str:
    """SPEC 1.3 user turn. A question that already ends its instructions with the sequential
    phrase (GPQA's) gets it replaced instead of a second instruction appended."""
    seq = PROMPT_SUFFIX_SEQUENTIAL.strip()
    suffix = prompt_suffix(parallel)
    if seq in question:
        return question.replace(seq, suffix.strip(), 1)
    return question + suffix


def assistant_turn(chain: str, answer: Any) -> str:
    """SPEC 1.3 assistant turn: the chain, ``"\\n\\nAnswer: "``, the answer."""
    return chain + ANSWER_PREFIX + str(answer)


def qa_messages(question: str, chain: str, answer: Any, parallel: bool = True) -> list[Message]:
    """A training chat: the user turn with its suffix and the assistant turn."""
    return [
        {"role": "user", "content": user_prompt(question, parallel)},
        {"role": "assistant", "content": assistant_turn(chain, answer)},
    ]


def render_chat(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """``messages`` as text: the tokenizer's chat template, or the plain rendering."""
    if not messages:
        return ""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return "".join(str(m["content"]) + "\n" for m in messages)


def chat_prompt(tokenizer: Any, question: str, parallel: bool = True) -> str:
    """The prompt a (trained) model is asked ``question`` with: the SPEC 1.3 user turn in the
    chat template, generation prompt added."""
    return render_chat(tokenizer, [{"role": "user", "content": user_prompt(question, parallel)}])


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an answer besides EOS: the chat turn end ``<|im_end|>`` and
    ``<|endoftext|>``, where the tokenizer has them as single tokens."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return [vocab[t] for t in STOP_TOKENS if t in vocab]
