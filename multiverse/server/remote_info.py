"""What ``multiverse serve`` tells the fork/join driver (:mod:`multiverse.remote`), so a driver
needs no argument against it: its ``/v1/models`` entry carries a ``multiverse`` object (the merge
modes it offers, the tag ids, the EOS ids, the context length, the recorded SPEC 1.3 prompt
format, where the tokenizer is) and ``GET /v1/multiverse/tokenizer`` serves the tokenizer files.

``exact`` is offered because a completions request with ``parallel: true`` lays out a prompt that
contains Multiverse structure by the layout rule (the engine prefills it with the layout's mask
and positions); ``flat`` (``parallel: false``) lays it out causally, as a stock engine does.
Completions with ``return_token_ids: true`` answer in token ids, the stop token kept last
(:mod:`.responses`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from multiverse.engine.policy import end_ids
from multiverse.format import tokenizer as tokenizers

TOKENIZER_ROUTE = "/v1/multiverse/tokenizer"


def advert(llm: Any, prompt_format: Any = None) -> dict[str, Any]:
    """The ``multiverse`` object of the ``/v1/models`` entry."""
    tok = llm.tokenizer
    try:
        tags: dict[str, int] | None = tokenizers.tag_ids(tok)
    except ValueError:
        tags = None
    eos = end_ids(tok, getattr(llm, "eos_token_ids", ()))  # the backend's, by the one rule
    config = getattr(getattr(llm, "model", None), "config", None)
    fmt = {"suffix": prompt_format.suffix, "source": prompt_format.source} if prompt_format is not None else None
    return {"merge_modes": ["exact", "flat"] if tags else ["flat"], "tag_ids": tags,
            "eos_token_ids": sorted(int(t) for t in eos), "prompt_format": fmt,
            "max_model_len": getattr(config, "max_position_embeddings", None), "tokenizer": TOKENIZER_ROUTE}  # fmt: skip


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer as ``save_pretrained`` writes it: file name -> text."""
    with tempfile.TemporaryDirectory(prefix="multiverse-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def install(app: Any, llm: Any) -> None:
    """Add ``GET /v1/multiverse/tokenizer`` (behind the API key like every other route)."""
    files: dict[str, str] = {}

    @app.get(TOKENIZER_ROUTE)
    async def tokenizer() -> dict[str, Any]:
        if not files:
            files.update(tokenizer_files(llm.tokenizer))
        return {"files": files}
