"""The SPEC 1.3 prompt and answer format: the one place a chat is rendered to text.

Trainer, evaluation, synthetic tasks, the demo, the server and ``multiverse generate`` all call
these functions; nothing else calls ``apply_chat_template`` or appends a prompt suffix.

  * user turn = question + :data:`PROMPT_SUFFIX_PARALLEL` (sequential/AR data:
    :data:`PROMPT_SUFFIX_SEQUENTIAL`);
  * assistant turn = the chain + :data:`ANSWER_PREFIX` + the answer;
  * a chat is rendered with the tokenizer's chat template; a tokenizer without one gets the
    plain rendering (each message's content followed by ``"\\n"``, no generation prompt), the
    same for training and inference;
  * an answer ends at EOS or at one of :func:`stop_token_ids` (the chat turn end);
  * a chat is ASKED as token ids (:func:`encode_chat`): message contents are text, so a special
    token or a Multiverse tag written in a message (``<|im_end|>``, ``<Parallel>``) stays
    ordinary characters, while the template's own control tokens are real; a trusted caller may
    opt in to parsing them in the contents (``special_tokens=True``). Structured prompts go as
    raw text or token ids (``generate --raw``, ``/v1/completions``).
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


def _special_texts(tokenizer: Any) -> list[str]:
    """The strings the tokenizer turns into special (control) tokens: its added tokens marked
    special (the chat-turn markers, EOS, the Multiverse tags)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, dict) and decoder:
        texts = [str(t) for t in decoder.values() if getattr(t, "special", True)]
    else:
        texts = list(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted({t for t in texts if t}, key=len, reverse=True)


def _content_spans(tokenizer: Any, messages: Sequence[Message], text: str,
                   add_generation_prompt: bool) -> list[tuple[int, int]] | None:  # fmt: skip
    """Where each message's content lies in ``text`` (the rendered chat), found by rendering the
    chat again with a marker in place of each content; ``None`` when the template changes the
    contents (then they cannot be told apart from its own text)."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    if any("\ue000" in str(m["content"]) or "\ue001" in str(m["content"]) for m in messages):
        return None
    marked = render_chat(tokenizer, [{**m, "content": k} for m, k in zip(messages, marks, strict=True)],
                         add_generation_prompt)  # fmt: skip
    spans: list[tuple[int, int]] = []
    at, out = 0, []  # position in ``marked``, pieces of the rebuilt text
    pos = 0  # position in the rebuilt text
    for m, k in zip(messages, marks, strict=True):
        i = marked.find(k, at)
        if i < 0:
            continue  # a template may leave a message out
        out.append(marked[at:i])
        pos += i - at
        content = str(m["content"])
        spans.append((pos, pos + len(content)))
        out.append(content)
        pos += len(content)
        at = i + len(k)
    out.append(marked[at:])
    return spans if "".join(out) == text else None


def _literal_spans(tokenizer: Any, messages: Sequence[Message], text: str, add_generation_prompt: bool,
                   special_tokens: bool) -> list[tuple[int, int]]:  # fmt: skip
    """The spans of ``text`` (the rendered chat) that are message contents holding special-token
    text, in order (none with ``special_tokens``: the caller wants it parsed)."""
    specials = [] if special_tokens else _special_texts(tokenizer)
    hits = [(i, i + len(s)) for s in specials for i in _find_all(text, s)]
    if not hits:
        return []
    spans = _content_spans(tokenizer, messages, text, add_generation_prompt)
    if spans is None:
        raise ValueError("a message holds special-token text and the chat template changes message contents, so "
                         "they cannot be encoded as text; send token ids to /v1/completions instead")  # fmt: skip
    return [(a, b) for a, b in spans if any(h0 < b and a < h1 for h0, h1 in hits)]


def encode_chat(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True,
                special_tokens: bool = False) -> list[int]:  # fmt: skip
    """The token ids of ``messages`` rendered by :func:`render_chat`: how a chat is asked.

    The template's own control tokens are real; a message's content is text: a special token
    or a tag written in it (``<|im_end|>``, ``<Parallel>``) is encoded as ordinary characters
    (``split_special_tokens``), so a user cannot forge a turn or a fork.
    ``special_tokens=True`` (a trusted caller) parses them in the contents too. A chat whose
    contents hold no such text encodes exactly as its rendered text does (as trained).
    Raises ``ValueError`` when a content holds special-token text and the template changes
    the contents so that they cannot be located."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    literal = _literal_spans(tokenizer, messages, text, add_generation_prompt, special_tokens) if text else []
    ids: list[int] = []
    at = 0
    for a, b in literal:
        if a > at:
            ids += tokenizer.encode(text[at:a], add_special_tokens=False)
        ids += tokenizer.encode(text[a:b], add_special_tokens=False, split_special_tokens=True)
        at = b
    if at < len(text):
        ids += tokenizer.encode(text[at:], add_special_tokens=False)
    return ids


def chat_input(tokenizer: Any, messages: Sequence[Message], special_tokens: bool = False) -> str | list[int]:
    """What the engine is given for ``messages`` (generation prompt added): the rendered text,
    or, when a message holds special-token text, :func:`encode_chat`'s ids (the engine parses
    special tokens in a text prompt). Either way the ids are :func:`encode_chat`'s."""
    text = render_chat(tokenizer, messages)
    if text and _literal_spans(tokenizer, messages, text, True, special_tokens):
        return encode_chat(tokenizer, messages, special_tokens=special_tokens)
    return text


def _find_all(text: str, sub: str) -> list[int]:
    out, i = [], text.find(sub)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def chat_prompt(tokenizer: Any, question: str, parallel: bool = True) -> str:
    """The prompt a (trained) model is asked ``question`` with: the SPEC 1.3 user turn in the
    chat template, generation prompt added."""
    return render_chat(tokenizer, [{"role": "user", "content": user_prompt(question, parallel)}])


def chat_prompt_input(tokenizer: Any, question: str, parallel: bool = True) -> str | list[int]:
    """:func:`chat_prompt` as the engine is given it (:func:`chat_input`: the question is text)."""
    return chat_input(tokenizer, [{"role": "user", "content": user_prompt(question, parallel)}])


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an answer besides EOS: the chat turn end ``<|im_end|>`` and
    ``<|endoftext|>``, where the tokenizer has them as single tokens."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return [vocab[t] for t in STOP_TOKENS if t in vocab]
