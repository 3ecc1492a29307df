"""Tokenizers and the Multiverse tags: the 12 tags as single special tokens, and the one loader.

  * :func:`add_tags_to_tokenizer` / :func:`add_tags_to_model`: what a base model needs before
    Multiverse training (SPEC 1.1): the tags as special tokens, embeddings resized to a multiple
    of 64, the new rows initialised from the tag words' sub-tokens;
  * :func:`tag_ids`: tag -> id read from a tokenizer (never hard-coded);
  * :func:`load_tokenizer`: the one way a tokenizer is loaded from a directory or a GGUF file
    (engine, trainer, eval, inspect);
  * :func:`resolve_tokenizer`: a ``--tokenizer`` value as a directory; the built-in names
    (:data:`BUILTIN_TOKENIZERS`: ``qwen2.5``, the released Multiverse-32B tokenizer rebuilt
    offline by :mod:`multiverse.format.qwen`) resolve to their built, cached directory.

transformers / tokenizers are imported inside the functions (extra ``hf``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multiverse.format import qwen
from multiverse.format.document import TAGS

_PROBE = "What is 9 * 7?\n\nAnswer: 63. Ünïcödé  text\twith 12 + 30 = 42.\n"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: str | Path) -> bool:
    """Does ``directory`` hold a saved tokenizer?"""
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


BUILTIN_TOKENIZERS: tuple[str, ...] = (qwen.QWEN25,)
"""Names a tokenizer source may be instead of a path (an existing path of that name wins)."""


def is_builtin_tokenizer(source: str | Path) -> bool:
    """Is ``source`` one of :data:`BUILTIN_TOKENIZERS` (and not an existing path)?"""
    return str(source).lower() in BUILTIN_TOKENIZERS and not Path(source).exists()


def resolve_tokenizer(source: str | Path) -> Path:
    """A tokenizer source as a path: a built-in name (``qwen2.5``) -> the directory its tokenizer
    is built and saved in once (:func:`multiverse.format.qwen.qwen25_tokenizer_dir`, under the
    user cache); anything else unchanged. Raises :class:`ImportError` naming the extra the
    build needs (``qwen``) when it is missing."""
    if is_builtin_tokenizer(source):
        return qwen.qwen25_tokenizer_dir()
    return Path(source)


def load_tokenizer(source: str | Path, gguf_file: str | None = None) -> Any:
    """The tokenizer saved in a directory (``save_pretrained``: ours or any HF fast tokenizer)
    or carried by a ``.gguf`` file (``source`` = the file, or its directory plus ``gguf_file``),
    or a built-in name (``qwen2.5``, :func:`resolve_tokenizer`).

    Loaded faithfully: ``AutoTokenizer`` in transformers 5 rebuilds the tokenizer of some model
    types from its own class (for ``qwen2``: Qwen's pre-tokenizer regex and NFC), ignoring a
    different pre-tokenizer stored in ``tokenizer.json``; when that changes how text is
    encoded, the file's own tokenizer is used instead (``PreTrainedTokenizerFast``).
    Raises :class:`FileNotFoundError` naming the path when there is no tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_tokenizer(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    if not has_tokenizer(path):
        raise FileNotFoundError(f"no tokenizer in {path} (expected one of {', '.join(TOKENIZER_FILES)})")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    file = path / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(file))
        if raw.encode(_PROBE, add_special_tokens=False).ids != tokenizer.encode(_PROBE, add_special_tokens=False):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    return tokenizer


def add_tags_to_tokenizer(tokenizer: Any) -> dict[str, int]:
    """Add the missing tags as single special tokens, in :data:`TAGS` order; return tag -> id.

    The tags that were missing are remembered on the tokenizer (``multiverse_new_tags``) so
    :func:`add_tags_to_model` initialises exactly those rows.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in TAGS if t not in vocab]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False, single_word=False) for t in missing],
            special_tokens=True,
        )
    tokenizer.multiverse_new_tags = list(getattr(tokenizer, "multiverse_new_tags", [])) + missing
    return tag_ids(tokenizer)


def tag_ids(tokenizer: Any) -> dict[str, int]:
    """tag -> token id, read from the tokenizer (never hard-coded). Raises if a tag is missing
    or is not a single token."""
    vocab = tokenizer.get_vocab()
    out: dict[str, int] = {}
    for t in TAGS:
        if t not in vocab:
            raise ValueError(f"tokenizer has no token {t!r}: call multiverse.format.tokenizer.add_tags_to_tokenizer first")
        out[t] = vocab[t]
        ids = tokenizer.encode(t, add_special_tokens=False)
        if ids != [vocab[t]]:
            raise ValueError(f"tag {t!r} does not encode as one token (got {ids})")
    return out


def add_tags_to_model(model: Any, tokenizer: Any, multiple: int = 64, tags: list[str] | None = None) -> None:
    """Resize the model's embeddings to ``len(tokenizer)`` rounded up to ``multiple`` and
    initialise each new tag's row (input and, if untied, output embedding) with the mean
    embedding of the tag word's ordinary sub-tokens (``"Goal"``, ``"/Path"``, ...).

    ``tags`` defaults to the tags :func:`add_tags_to_tokenizer` added, plus any tag whose id
    lies beyond the model's current embedding rows.
    """
    import torch

    ids = tag_ids(tokenizer)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if tags is None:
        tags = [t for t in TAGS if t in set(getattr(tokenizer, "multiverse_new_tags", [])) or ids[t] >= old_rows]
    size = -(-len(tokenizer) // multiple) * multiple
    model.resize_token_embeddings(size, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    untied = out is not None and out.weight.data_ptr() != emb.data_ptr()
    with torch.no_grad():
        for t in tags:
            word = t[1:-1]  # "Goal", "/Path"
            sub = [i for i in tokenizer.encode(word, add_special_tokens=False) if i < old_rows]
            if not sub:
                continue
            emb[ids[t]] = emb[sub].mean(0)
            if untied:
                out.weight[ids[t]] = out.weight[sub].mean(0)
