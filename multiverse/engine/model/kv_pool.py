"""The preallocated, token-granular key/value storage every sequence reads from.

Invariants:

- One buffer ``kv [num_layers, num_slots, 2, num_kv_heads, head_dim]`` holds K and V
  interleaved, so one ``index_copy_`` per layer writes both; ``k`` / ``v`` are (non-contiguous)
  views of it.
- Keys are stored in the model's interleaved RoPE layout (see :mod:`.rope`).
- The pool is zero-initialised, so a padded gather of an unused slot reads finite numbers. On
  CPU it is an anonymous memory map (zero by definition): a page is faulted in, already zero,
  when a slot on it is first touched, so a large pool costs memory and time only for the slots
  used (``torch.zeros`` wrote every page up front: 0.4-1.6 s of CPU a GiB, most of it page
  faults, and the whole pool resident).
- Which slots are in use is the engine's bookkeeping (``kv_manager``), never the pool's.
- :meth:`KVPool.bytes_per_slot` is the one source for "KV bytes per token".
"""

from __future__ import annotations

import math
import mmap
from typing import TYPE_CHECKING, Any

import torch

from multiverse.engine.model.spec import ModelSpec, resolve_dtype

if TYPE_CHECKING:
    from multiverse.engine.model.causal_lm import CausalLM


class KVPool:
    """Preallocated key/value storage at token granularity, shared by all sequences.

    ``kv[layer, slot, 0]`` is the key and ``kv[layer, slot, 1]`` the value of the token stored in
    ``slot`` (shape ``[num_kv_heads, head_dim]``, keys in the model's internal RoPE layout).
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if min(num_layers, num_slots, num_kv_heads, head_dim) <= 0:
            raise ValueError(
                f"KVPool sizes must be positive, got num_layers={num_layers}, "
                f"num_slots={num_slots}, num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        # [num_layers, num_slots, 2, num_kv_heads, head_dim]
        self.kv = _zeros(
            (num_layers, num_slots, 2, num_kv_heads, head_dim), self.dtype, self.device
        )
        self.k = self.kv[:, :, 0]  # [num_layers, num_slots, num_kv_heads, head_dim] (view)
        self.v = self.kv[:, :, 1]

    @classmethod
    def for_model(cls, model: CausalLM, num_slots: int) -> KVPool:
        """A pool shaped, typed and placed for ``model``."""
        return cls(
            model.num_layers,
            num_slots,
            model.num_kv_heads,
            model.head_dim,
            dtype=model.dtype,
            device=model.device,
        )

    @staticmethod
    def bytes_per_slot(config: Any, dtype: str | torch.dtype) -> int:
        """Bytes one token's K and V take over all layers of a model with this HF config."""
        spec = ModelSpec.from_config(config)
        itemsize = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
        return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * itemsize

    def __repr__(self) -> str:
        return (
            f"KVPool(num_layers={self.num_layers}, num_slots={self.num_slots}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
            f"device={self.device})"
        )


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on CPU backed by an anonymous ``mmap`` (the kernel hands out zero pages on
    first touch), so untouched parts cost neither time nor resident memory."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # private (a forked process writes its own copy, as with torch.zeros), anonymous: zero-filled
    buf = mmap.mmap(-1, max(1, count * itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)
