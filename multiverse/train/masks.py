"""Attention masks for a training batch, from the rows' layouts, per attention backend.

Every mask here is built by :class:`multiverse.format.layout.Layout` itself (``block_mask``,
``mask_mod``, ``dense_mask``, ``hf_attention_mask``); this module only picks the form the
model's attention implementation takes and stacks rows:

  ================  ==========================================  =========================
  backend           mask passed as ``attention_mask``           memory per row
  ================  ==========================================  =========================
  ``flex``          ``BlockMask`` [B, 1, n, n] (block-sparse)   O(n^2 / block^2) + O(n)
  ``sdpa``          bool [B, 1, n, n] (True = may attend)       n^2 bytes (small n only)
  ``eager``         additive float [B, 1, n, n] (0 / min)       4 n^2 bytes (reference)
  ================  ==========================================  =========================

A batch whose rows are all plain causal (one document, no ``<Parallel>`` block) gets ``None``:
the model then uses its own causal path (``is_causal`` kernels), exactly what plain
autoregressive training does. Transformers 5 passes a 4-D tensor or a ``BlockMask`` given as
``attention_mask`` straight to the attention function (``masking_utils._preprocess_mask_arguments``
returns it as is), so no model code is patched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from multiverse.format.layout import Layout
from multiverse.train.data import ConfigError

Backend = Literal["flex", "sdpa", "eager"]
BACKENDS: tuple[str, ...] = ("auto", "flex", "sdpa", "eager")
ATTN_IMPLEMENTATION: dict[str, str] = {"flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device | str, training: bool = True) -> Backend:
    """``auto`` -> ``flex`` on CUDA (when available), ``sdpa`` elsewhere.

    Raises :class:`ConfigError` naming the problem for a choice that cannot run (flex_attention has no
    backward pass on CPU in PyTorch).
    """
    if requested not in BACKENDS:
        raise ConfigError(
            f"unknown attention backend {requested!r}: choose one of {', '.join(BACKENDS)}"
        )
    dev = torch.device(device)
    if requested == "auto":
        return "flex" if dev.type == "cuda" and flex_available() else "sdpa"
    if requested == "flex":
        if not flex_available():
            raise ConfigError(
                "attention 'flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5)"
            )
        if training and dev.type == "cpu":
            raise ConfigError(
                "attention 'flex' cannot train on CPU (flex_attention has no CPU backward); "
                "use --attention sdpa"
            )
    return requested  # type: ignore[return-value]


def is_plain_causal(layout: Layout) -> bool:
    """One document and no parallel block: the mask is the ordinary causal mask."""
    return layout.num_levels == 0 and bool((layout.doc_ids == layout.doc_ids[0]).all())


def attention_mask_for(
    layouts: Sequence[Layout],
    backend: Backend,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    block_size: int = 128,
) -> Any:
    """The ``attention_mask`` argument for a batch whose row ``r`` has layout ``layouts[r]``.

    Returns ``None`` (plain causal), a ``BlockMask`` (flex) or a 4-D tensor (sdpa/eager).
    """
    if not layouts:
        raise ValueError("no layouts")
    if all(is_plain_causal(lay) for lay in layouts):
        return None
    rows = [lay.to(device) for lay in layouts]
    if backend == "flex":
        return _stack_block_masks([lay.block_mask(block_size) for lay in rows])
    if backend == "sdpa":
        return torch.stack([lay.dense_mask() for lay in rows])[:, None]  # [B, 1, n, n] bool
    if backend == "eager":
        return torch.cat([lay.hf_attention_mask(dtype) for lay in rows])  # [B, 1, n, n] float
    raise ValueError(f"unknown attention backend {backend!r}")


def _stack_block_masks(masks: list[Any]) -> Any:
    """One ``BlockMask`` of batch size B from B single-row masks of the same length: block
    indices are concatenated, and the mask_mod of row b is the b-th row's own mask_mod."""
    if len(masks) == 1:
        return masks[0]
    from torch.nn.attention.flex_attention import BlockMask

    mods = [m.mask_mod for m in masks]

    def mask_mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for r in range(1, len(mods)):
            out = torch.where(b == r, mods[r](b, h, q_idx, kv_idx), out)
        return out

    def cat(name: str):
        parts = [getattr(m, name) for m in masks]
        return None if parts[0] is None else torch.cat(parts, 0)

    first = masks[0]
    return BlockMask.from_kv_blocks(
        cat("kv_num_blocks"),
        cat("kv_indices"),
        cat("full_kv_num_blocks"),
        cat("full_kv_indices"),
        BLOCK_SIZE=first.BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=first.seq_lengths,
    )
