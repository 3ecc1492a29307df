"""Weight-only int8 / int4 quantisation of the engine's linear layers (CPU).

``CausalLM.quantize_("int8" | "int4")`` replaces each layer's fused q/k/v, output, gate/up and
down matrices and the LM head (int8 in both: :data:`HEAD_QUANTIZATION`) by a
:class:`QuantLinear` (biases, norms and the embedding table stay in the model's dtype). The
formats:

- ``int8``: symmetric, one scale per output row: ``w = q * scale``, ``q`` in [-127, 127].
- ``int4``: asymmetric, one scale and zero point per ``group_size`` input columns of a row:
  ``w = (q - 8) * scale + zero``, ``q`` in [0, 15] (``zero`` is the group's value at ``q = 8``),
  the layout of torch's CPU kernel.

Scales and zeros are rounded to bfloat16 when quantising, so the fast path and the reference
use the same dequantised weights. The fast path (:meth:`QuantLinear.forward`) runs torch's CPU
kernels ``torch._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu`` with bfloat16
activations: their float32-activation path is a scalar loop, 10-25x slower than a float32
matmul (measured on AVX-512, torch 2.13), while the bfloat16 one reads 4x (int8) / 8x (int4)
fewer weight bytes than float32.

int8 at up to 16 rows (``cpu_kernels.MAX_ROWS``) on one thread runs :mod:`.cpu_kernels` (a
compiled AVX-512 or AVX2 loop, float32 activations: 1.4-2.2x torch's kernels below, 1.04-3.4x
float32, on a whole SmolLM2 step's matrices) where it is built. Otherwise int8 at
up to :data:`NIBBLE_MAX_ROWS` rows (decode at small batches) runs on the int4 kernel instead: ``q + 128 = 16 hi + lo`` splits each int8 weight into two 4-bit planes, stored side by
side as one ``[N, 2K]`` int4 matrix (``hi`` with scale ``16 s`` and zero 0, ``lo`` with scale
``s`` and zero ``8 s``: exactly ``s q``), multiplied by ``[x, x]``; the kernel sums both planes
in float32 before its one bfloat16 rounding, like the int8 kernel. The same weight bytes, but
torch's int8 kernel streams them at ~7 GB/s against ~18 GB/s for the int4 kernel's packed
layout (one thread, AMD EPYC, AVX-512): a whole SmolLM2-135M step's matrices at 1 row took
22.6 ms int8 kernel / 17.1 ms nibble planes (thread time); from 8 rows the int8 kernel wins. The reference (:meth:`QuantLinear.reference`) dequantises to float32 and
runs ``F.linear``; the difference between the two is bfloat16 rounding of the activations and
of the output (tests/engine/test_quant.py). A GGUF's quantised tensors arrive here dequantised by
the loader and are requantised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multiverse.engine.model import cpu_kernels

QUANTIZATIONS = ("int8", "int4")
# The LM head's format per method. SmolLM2-135M (GGUF: Q4_1 layers, Q8_0 embedding), teacher-forced
# argmax agreement with float32 on 16 x 32 greedy tokens: int4 layers + int4 head 92.4%, + int8
# head 98.8% (measured for tests/engine/test_quant_quality.py).
HEAD_QUANTIZATION = {"int8": "int8", "int4": "int8"}
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
DEFAULT_INT4_GROUP_SIZE = 32
NIBBLE_MAX_ROWS = 4  # int8 on the int4 kernel up to this many rows (faster at 1-4, slower at 8)
_KERNEL_DTYPE = torch.bfloat16


def check_quantization(method: str | None, device: torch.device | str, group_size: int = 0) -> None:
    """Refuse, with the reason, a quantisation this torch build or ``device`` cannot run."""
    if method is None:
        return
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization={method!r}: expected None, 'int8' or 'int4'")
    dev = torch.device(device)
    if dev.type != "cpu":
        raise ValueError(
            f"quantization={method!r} runs on CPU only (torch's weight-only CPU kernels); the "
            f"model is on {dev}: use device='cpu' or quantization=None"
        )
    kernel = "_weight_int8pack_mm" if method == "int8" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, kernel):
        raise ValueError(f"quantization={method!r} needs torch.ops.aten.{kernel}, which torch "
                         f"{torch.__version__} lacks")  # fmt: skip
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"quant_group_size={group_size}: the int4 CPU kernel takes one of {INT4_GROUP_SIZES}"
        )


class QuantLinear(nn.Module):
    """A weight-only quantised ``[out_features, in_features]`` matrix, no bias.

    Buffers: ``qweight`` (int8 ``[N, K]``; int4: two values a byte, ``[N, K/2]`` uint8, low
    nibble = even column), ``scales`` (int8 ``[N]``; int4 ``[N, K/G]``), ``zeros`` (int4
    ``[N, K/G]``), all float32 holding bfloat16 values; ``packed`` / ``kernel_scales`` are the
    kernel's copies; int8's ``nibbles`` / ``nibble_scales`` the int4 kernel's copy (None where
    N % 16 or K % 32: then the int8 kernel at every row count).
    """

    def __init__(self, method: str, weight: torch.Tensor, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                 name: str = "weight", lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:  # fmt: skip
        super().__init__()
        # a LoRA adapter's delta kept beside the quantised base weight, float32: (A [R, K], B [N, R])
        self.register_buffer("lora_a", None if lora is None else lora[0].float().contiguous())
        self.register_buffer("lora_b", None if lora is None else lora[1].float().contiguous())
        if weight.dim() != 2:
            raise ValueError(f"{name}: quantise a 2-D weight, got shape {tuple(weight.shape)}")
        n, k = weight.shape
        self.method, self.out_features, self.in_features = method, n, k
        self.group_size = group_size if method == "int4" else k
        w = weight.detach().float()
        if method == "int8":
            scale = _bf16(w.abs().amax(1) / 127).clamp(min=2**-100)  # [N]
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scale)
            self.register_buffer("kernel_scales", scale.to(_KERNEL_DTYPE))
            has_int4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            self.nibble_group = max(_dividers(k), default=0) if has_int4 else 0
            planes = _nibble_planes(q, scale, self.nibble_group) if n % 16 == 0 else None
            self.register_buffer("nibbles", None if planes is None else planes[0])
            self.register_buffer("nibble_scales", None if planes is None else planes[1])
            cpu_kernels.load()  # built once per machine, loaded once per process (logged)
            return
        if method != "int4":
            raise ValueError(f"{name}: quantization={method!r}: expected 'int8' or 'int4'")
        if k % group_size:
            raise ValueError(f"{name}: int4 quant_group_size={group_size} does not divide its "
                             f"{k} input features; pick one of {_dividers(k)}")  # fmt: skip
        if n % 16:
            raise ValueError(f"{name}: the int4 CPU kernel needs a multiple of 16 output features, "
                             f"this matrix has {n}; use quantization='int8'")  # fmt: skip
        g = w.reshape(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = _bf16((hi - lo) / 15).clamp(min=2**-100)  # [N, K/G]
        zero = _bf16(lo + 8 * scale)
        q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
        q = q.to(torch.uint8).reshape(n, k)
        self.register_buffer("qweight", q[:, ::2] | (q[:, 1::2] << 4))
        self.register_buffer("scales", scale)
        self.register_buffer("zeros", zero)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.register_buffer("packed", packed)
        sz = torch.stack([scale.t(), zero.t()], -1).contiguous()  # [K/G, N, 2]
        self.register_buffer("kernel_scales", sz.to(_KERNEL_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fast path: x ``[T, K]`` -> ``[T, N]`` in x's dtype (bfloat16 activations; int8 at
        up to 16 rows on one thread: :mod:`.cpu_kernels`, float32 activations, where built), plus
        the adapter's low-rank delta in float32 where there is one."""
        out = self._base_forward(x)
        if self.lora_a is None:
            return out
        return out + ((x.float() @ self.lora_a.t()) @ self.lora_b.t()).to(out.dtype)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "int8" and x.shape[0] <= cpu_kernels.MAX_ROWS:
            fn = cpu_kernels.int8_library()
            if fn is not None and torch.get_num_threads() == 1:
                return cpu_kernels.matvec(fn, x.float(), self.qweight, self.scales).to(x.dtype)
        xk = x.to(_KERNEL_DTYPE)
        if self.method == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                xk, self.packed, self.group_size, self.kernel_scales
            )
        elif self.nibbles is not None and xk.shape[0] <= NIBBLE_MAX_ROWS:
            out = self.nibble_forward(xk)
        else:
            out = torch._weight_int8pack_mm(xk, self.qweight, self.kernel_scales)
        return out.to(x.dtype)

    def nibble_forward(self, xk: torch.Tensor) -> torch.Tensor:
        """int8 on the int4 kernel (module docstring): bfloat16 xk ``[T, K]`` -> bfloat16."""
        if self.nibbles is None:
            raise ValueError(f"{self.extra_repr()}: no nibble planes (int8 with N % 16 == 0 and "
                             f"K % 32 == 0 only)")  # fmt: skip
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            torch.cat((xk, xk), 1), self.nibbles, self.nibble_group, self.nibble_scales
        )

    def dequantize(self) -> torch.Tensor:
        """The weight the quantised values (and the adapter's delta) stand for, float32 ``[N, K]``."""
        if self.method == "int8":
            w = self.qweight.float() * self.scales[:, None]
        else:
            q = torch.stack([self.qweight & 15, self.qweight >> 4], -1).reshape(self.out_features, -1)
            g = q.float().reshape(self.out_features, -1, self.group_size)
            w = ((g - 8) * self.scales[..., None] + self.zeros[..., None]).reshape(q.shape)
        return w if self.lora_a is None else w + self.lora_b @ self.lora_a

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: dequantise, then a float32 ``F.linear``; returns x's dtype."""
        return F.linear(x.float(), self.dequantize()).to(x.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.method == "int4" else ""
        r = "" if self.lora_a is None else f", adapter rank={self.lora_a.shape[0]}"
        return f"{self.method}, in={self.in_features}, out={self.out_features}{g}{r}"


def low_rank(delta: torch.Tensor, rank: int, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A [R, K], B [N, R])`` with ``B @ A == delta`` (an adapter's merged delta, rank <= ``rank``),
    R the components above 1e-5 of the largest; None for a zero delta. A randomized SVD, the full
    one when that leaves more than 1e-4 of ``delta`` out (``ValueError`` if even that does)."""
    delta = delta.detach().float()
    norm = delta.norm()
    if norm == 0:
        return None
    # the randomized SVD first; the full one when it falls short (or the matrix is that small)
    for exact in (True,) if rank + 8 >= min(delta.shape) else (False, True):
        if exact:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        else:
            u, s, v = torch.svd_lowrank(delta, q=rank + 8, niter=4)
            vh = v.t()
        keep = (s > s[0] * 1e-5) & (torch.arange(len(s)) < rank)
        a, b = s[keep, None] * vh[keep], u[:, keep]
        if (delta - b @ a).norm() <= 1e-4 * norm:
            return a.contiguous(), b.contiguous()
    raise ValueError(f"{name}: the adapter's delta is not of rank <= {rank} (left out: "
                     f"{float((delta - b @ a).norm() / norm):.2e} of it)")  # fmt: skip


def linear(
    x: torch.Tensor, weight: torch.Tensor | QuantLinear, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear`` for a plain, a quantised or a packed weight (any non-tensor with ``forward``)."""
    if not isinstance(weight, torch.Tensor):
        out = weight.forward(x)
        return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias)  # type: ignore[arg-type]


def add_linear(x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor | QuantLinear,
               bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """``x + linear(inp, weight, bias)`` (one ``addmm`` for a plain weight without bias)."""
    if bias is None and isinstance(weight, torch.Tensor):
        return torch.addmm(x, inp, weight.t())  # type: ignore[union-attr]
    return x + linear(inp, weight, bias)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _nibble_planes(
    q: torch.Tensor, scale: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int8 ``q [N, K]`` (scale ``[N]``) as the int4 kernel's ``[N, 2K]`` matrix of its high
    and low nibble planes and their ``[2K/G, N, 2]`` scales/zeros; None where the kernel cannot
    take it (no group size divides K)."""
    if not group:
        return None
    n, k = q.shape
    u = q.to(torch.int32) + 128  # [1, 255] = 16 hi + lo
    planes = torch.cat([u >> 4, u & 15], 1).contiguous()  # [N, 2K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(planes, 1)
    ng = k // group
    hi = torch.stack([16 * scale, torch.zeros_like(scale)], -1)  # (hi - 8) 16 s + 0
    lo = torch.stack([scale, 8 * scale], -1)  # (lo - 8) s + 8 s
    sz = torch.cat([hi[None].expand(ng, n, 2), lo[None].expand(ng, n, 2)])  # [2K/G, N, 2]
    return packed, sz.to(_KERNEL_DTYPE).contiguous()


def _dividers(k: int) -> list[int]:
    return [g for g in INT4_GROUP_SIZES if k % g == 0]
