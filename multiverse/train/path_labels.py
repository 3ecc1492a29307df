"""No loss on the path labels the engine writes itself.

Under the layout rule (SPEC 2) sibling Paths see the same context, so the label that opens a
Path (``1:``, ``2:``, ``1.2:`` right after ``<Path>\\n``) cannot be predicted: the first token
of every sibling is asked for from the same view. The engine does not sample it either: a fork
forces ``<Path>`` + ``"\\n{label}:"`` into each child (:mod:`multiverse.engine.forkjoin`). So
training puts no loss on those tokens; every other target is unchanged.

Invariant: :func:`mask_path_labels` only turns targets into ``IGNORE_INDEX``, and only the
tokens that spell a label ``<digits>(.<digits>)*:`` right after a ``<Path>`` token (leading
whitespace-only tokens, the ``\\n``, stay targets). A Path without such a label is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100
"""The label of a token that carries no loss (transformers' convention); the one definition,
re-exported by :mod:`multiverse.train.data`."""
_LABEL = re.compile(r"\d+(?:\.\d+)*:")
_MAX_LABEL_TOKENS = 16  # "1.2.3:" is at most a handful of tokens in any BPE


def path_label_positions(input_ids: Sequence[int], path_id: int, tokenizer: Any) -> list[int]:
    """Indices of the tokens that spell the label right after each ``<Path>`` token."""
    out: list[int] = []
    n = len(input_ids)
    for i, tok in enumerate(input_ids):
        if tok != path_id:
            continue
        j = i + 1
        while j < n and tokenizer.decode([input_ids[j]]).strip() == "" and j - i <= 2:
            j += 1  # the "\n" after <Path> (and a stray space) stays a target
        text = ""
        for k in range(j, min(n, j + _MAX_LABEL_TOKENS)):
            text += tokenizer.decode([input_ids[k]])
            if ":" in text:
                if _LABEL.fullmatch(text.strip()):
                    out.extend(range(j, k + 1))
                break
    return out


def path_token_id(tokenizer: Any) -> int | None:
    """The id of ``<Path>`` when the tokenizer has it as one token, else None."""
    ids = tokenizer.encode("<Path>", add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def mask_path_labels(input_ids: Sequence[int], labels: list[int], tokenizer: Any) -> list[int]:
    """``labels`` with the path-label tokens (:func:`path_label_positions`) set to -100."""
    path_id = path_token_id(tokenizer)
    if path_id is None:
        return list(labels)
    masked = list(labels)
    for i in path_label_positions(input_ids, path_id, tokenizer):
        masked[i] = IGNORE_INDEX
    return masked
