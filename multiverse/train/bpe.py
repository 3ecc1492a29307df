"""The project's own small tokenizer: a deterministic byte-level BPE with Multiverse tags.

It lives with the trainer because it is trained on the synthetic tasks' text
(:func:`default_corpus`); loading a saved one is :func:`multiverse.format.tokenizer.load_tokenizer`.

Used by tests, the synthetic task family and the tiny models trained from scratch, so nothing
has to be downloaded. Built from text the project generates itself (synthetic MapReduce
problems and solutions from :mod:`multiverse.eval.tasks` plus a little generic English/math text
written below).

Invariants (tests check each):
  - ``len(tokenizer) == vocab_size`` for the default corpus (at most ``vocab_size`` for a
    corpus too small to learn that many merges; size embeddings with ``len(tokenizer)``):
    the BPE ids first (the three chat special tokens, 256 byte symbols, merges), then the 12 tags of :data:`multiverse.format.grammar.TAGS`
    as single special tokens with consecutive ids in that order (the last 12 ids).
  - Special tokens: ``<|endoftext|>`` (eos and pad, id 0), ``<|im_start|>``, ``<|im_end|>``.
  - Same pipeline as transformers' ``Qwen2Tokenizer`` (NFC, Qwen2's pre-tokenizer pattern,
    byte-level BPE): a directory holding this tokenizer and a Qwen2 ``config.json`` loads
    through ``AutoTokenizer`` (which then picks ``Qwen2Tokenizer``) with identical ids.
  - ``"\\n"`` alone is one token, so a ``\\n`` next to a tag (after ``</Goal>``, ``</Path>``,
    before ``<Path>``: what the engine inserts) is the same token a trainer sees. (Inside
    text, a newline may merge with punctuation before it or with further newlines.)
  - Digits are pre-tokenized one by one, so every number is a sequence of single-digit tokens.
  - Byte-level: ``decode(encode(text)) == text`` for any NFC text, tags included.
  - Deterministic: the same ``vocab_size`` and corpus give the same vocabulary and merges.

The chat template is Qwen2.5-style: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message,
a default system message when the conversation has none, and ``<|im_start|>assistant\\n`` for
``add_generation_prompt``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from multiverse.format.grammar import TAGS
from multiverse.format.tokenizer import add_tags_to_tokenizer, load_tokenizer  # noqa: F401 (load_tokenizer: the saved BPE loads like any tokenizer)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_VOCAB_SIZE = 512

# Qwen2's pre-tokenizer pattern. transformers loads any tokenizer saved next to a Qwen2
# config.json through ``Qwen2Tokenizer``, which rebuilds the pipeline with this pattern, NFC and
# byte-level; using the same pipeline makes both load paths tokenize identically. Digits are
# isolated one by one (``\p{N}``), a lone "\n" is one piece.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
).replace("default_system", repr(DEFAULT_SYSTEM_PROMPT))

_GENERIC_TEXT = """\
You are a helpful assistant.
Think step by step before answering. Think step by step and in parallel before answering.
Let's think in parallel.
The answer is the sum of the parts. We add the numbers and then check the result.
First, we compute each value. Then we combine them to get the total.
So the total is 12. Therefore the final answer is 7. The maximum is 9 and the minimum is 3.
What is the product of 3 and 4? The product of 3 and 4 is 12.
How many vowels are in the word apple? The word apple has 2 vowels.
Each list has a total. The largest total wins. Count the items, then add the counts.
If x = 5 and y = 7, then x + y = 12 and x * y = 35. Compute 8 - 3 = 5 and 9 / 3 = 3.
The sum of the first n integers is n(n+1)/2. A triangle has three sides and three angles.
Let a, b and c be positive integers such that a + b = c. Find the value of a * b.
The probability of an event is between 0 and 1. The fraction 1/2 equals 0.5.
We check both cases: in the first case the value is even, in the second case it is odd.
Summary: all parts agree, so the result holds. Answer: 42
"""


def _tags() -> tuple[str, ...]:
    return tuple(TAGS)


def _add_tags(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return add_tags_to_tokenizer(tokenizer)


def default_corpus() -> list[str]:
    """The text the default tokenizer is trained on: generic text + synthetic task records."""
    texts = [_GENERIC_TEXT]
    from multiverse.eval import tasks

    texts.extend(tasks.corpus_text())
    return texts


def build_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` (default :func:`default_corpus`) and wrap it.

    ``vocab_size`` is the final ``len(tokenizer)``, the 12 Multiverse tags included (an upper
    bound when the corpus is too small to learn that many merges); it must leave room for the
    256 byte symbols, the 3 chat specials and the tags.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tags = _tags()
    minimum = 256 + len(SPECIAL_TOKENS) + len(tags)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {minimum}")
    texts = list(default_corpus() if corpus is None else corpus)
    if not texts:
        raise ValueError("corpus is empty: give at least one string to train the BPE on")

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(tags),
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    _add_tags(tokenizer)
    _check(tokenizer, tags)
    return tokenizer


def _check(tokenizer: PreTrainedTokenizerFast, tags: tuple[str, ...]) -> None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tags]
    if ids != list(range(ids[0], ids[0] + len(tags))):
        raise RuntimeError(f"tag ids are not consecutive in TAGS order: {ids}")


@functools.lru_cache(maxsize=4)
def _cached(vocab_size: int) -> PreTrainedTokenizerFast:
    return build_tokenizer(vocab_size)


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The default tokenizer, built once per process and cached.

    The same object is returned on every call: do not mutate it (copy it or call
    :func:`build_tokenizer` for a private one).
    """
    return _cached(vocab_size)
