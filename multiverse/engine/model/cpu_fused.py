"""Fused C kernels for the small ops of a float32 CPU step (everything but the matrices).

At decode shapes each torch op costs its dispatch (~5-10 us) more than its arithmetic, and a
layer ran ~25 of them besides its four matrices (``F.rms_norm`` alone is 6 aten ops): ~0.1-0.2 ms
a layer, 30 layers, every step. :func:`run_layers` runs a step's layers with three C calls in
place of those ops:

- ``add_rms_norm``: the pending residual add (the previous matrix's output) and the next RMSNorm
  in one pass (``x += delta; out = x * rsqrt(mean(x^2) + eps) * w``);
- ``rope_store``: RoPE on the new q and k heads (interleaved layout, :mod:`.rope`) in place and
  the new K/V row written into the pool at its slot (was ``view_as_complex(...).mul_`` and
  ``index_copy_``);
- ``silu_mul``: ``silu(gate) * up`` (AVX-512 ``exp``, a degree-7 polynomial after range
  reduction: within float32 rounding of torch's).

The matrices, the attention backend (``plan.attend``) and biases run as in the reference loop.
Built like :mod:`.cpu_kernels` (same compiler, flags and cache, AVX-512 only) and loaded with
ctypes; torch's ops run where the CPU lacks AVX-512, the build fails (one warning), torch uses
more than one thread, the model is not float32 on CPU or has Qwen3's q/k norm, or
``CausalLM.set_fused_ops(False)`` (the reference). Parity: tests/engine/test_cpu_fused.py.
"""

from __future__ import annotations

import ctypes
import logging
import time
import warnings
from typing import Any

import torch

from multiverse.engine.model import cpu_kernels
from multiverse.engine.model.cpu_source import EXP512
from multiverse.engine.model.quant import linear

log = logging.getLogger(__name__)

SOURCE = (
    r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

/* x [T, H] += delta (if not NULL); out [T, H] = x * rsqrt(mean(x^2) + eps) * w. */
void add_rms_norm(float *x, const float *delta, const float *w, float *out,
                  int64_t T, int64_t H, float eps) {
    for (int64_t t = 0; t < T; t++) {
        float *xr = x + t * H;
        float *o = out + t * H;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < H; k += 16) {
            __mmask16 m = lanes(H - k);
            __m512 v = _mm512_maskz_loadu_ps(m, xr + k);
            if (delta) {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, delta + t * H + k));
                _mm512_mask_storeu_ps(xr + k, m, v);
            }
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps);
        __m512 s = _mm512_set1_ps(inv);
        for (int64_t k = 0; k < H; k += 16) {
            __mmask16 m = lanes(H - k);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + k), s);
            _mm512_mask_storeu_ps(o + k, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + k)));
        }
    }
}

/* qkv [T, W]: its first Hqk heads of D (q then k, pairs 2i, 2i+1) rotated in place by rope
   [T, D/2] (cos, sin pairs), 16 floats at a time: x * (c, c) + swap(x) * (-s, s); then the row's
   `row` floats from column Hq * D (k heads, v heads) copied to pool row slots[t]. */
void rope_store(float *qkv, const float *rope, const int64_t *slots, float *pool, int64_t T,
                int64_t W, int64_t Hqk, int64_t Hq, int64_t row, int64_t D) {
    for (int64_t t = 0; t < T; t++) {
        float *r = qkv + t * W;
        const float *cs = rope + t * D;
        for (int64_t i = 0; i < D; i += 16) {
            __mmask16 m = lanes(D - i);
            __m512 v = _mm512_maskz_loadu_ps(m, cs + i);  /* c0 s0 c1 s1 ... */
            __m512 c = _mm512_moveldup_ps(v);
            __m512 s = _mm512_movehdup_ps(v);
            s = _mm512_mask_sub_ps(s, 0x5555, _mm512_setzero_ps(), s);  /* -s, s */
            for (int64_t h = 0; h < Hqk; h++) {
                float *p = r + h * D + i;
                __m512 x = _mm512_maskz_loadu_ps(m, p);
                __m512 y = _mm512_fmadd_ps(_mm512_permute_ps(x, 0xB1), s, _mm512_mul_ps(x, c));
                _mm512_mask_storeu_ps(p, m, y);
            }
        }
        memcpy(pool + slots[t] * row, r + Hq * D, (size_t)row * sizeof(float));
    }
}

"""
    + EXP512
    + r"""
/* out [T, I] = silu(gu[t, :I]) * gu[t, I:] for gu [T, 2I]. */
void silu_mul(const float *gu, float *out, int64_t T, int64_t I) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        for (int64_t i = 0; i < I; i += 16) {
            __mmask16 m = lanes(I - i);
            __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
            __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
        }
    }
}

/* out[r] = the first index of the largest value of row r of x [R, V] (V < 2^31); a NaN counts
   as the largest (the first NaN), as torch.argmax. */
void argmax_rows(const float *x, int64_t *out, int64_t R, int64_t V) {
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * V;
        __m512 best = ninf;
        __m512i at = _mm512_set1_epi32(-1);
        int64_t nan_at = -1;
        for (int64_t k = 0; k < V; k += 16) {
            __m512 v = _mm512_mask_loadu_ps(ninf, lanes(V - k), row + k);
            __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            if (nan) { nan_at = k + __builtin_ctz(nan); break; }
            __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            best = _mm512_mask_mov_ps(best, gt, v);
            at = _mm512_mask_mov_epi32(at, gt, _mm512_add_epi32(iota, _mm512_set1_epi32((int)k)));
        }
        if (nan_at >= 0) { out[r] = nan_at; continue; }
        __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
        int first = _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(_mm512_set1_epi32(0x7fffffff), top, at));
        out[r] = first < 0 ? 0 : first;  /* every value -inf: index 0 */
    }
}
"""
)

_state: dict[str, Any] = {}  # "lib": the loaded library or None, once per process


def load(cc: str | None = None, directory=None):
    """The fused kernels' library (compiled once per machine, cached), or None where the CPU
    lacks AVX-512 or it cannot be built (then one warning). Once per process."""
    if "lib" in _state:
        return _state["lib"]
    fn = None
    if cpu_kernels.supported():
        start = time.perf_counter()
        try:
            path = cpu_kernels.build(cc, directory, source=SOURCE, stem="cpu_fused")
            fn = ctypes.CDLL(str(path))
            p, i = ctypes.c_void_p, ctypes.c_int64
            fn.add_rms_norm.argtypes = [p, p, p, p, i, i, ctypes.c_float]
            fn.rope_store.argtypes = [p, p, p, p] + [i] * 6
            fn.silu_mul.argtypes = [p, p, i, i]
            fn.argmax_rows.argtypes = [p, p, i, i]
            for f in (fn.add_rms_norm, fn.rope_store, fn.silu_mul, fn.argmax_rows):
                f.restype = None
        except (RuntimeError, OSError, AttributeError) as err:
            fn = None
            warnings.warn(f"fused CPU kernels unavailable, torch's ops run instead "
                          f"(slower steps): {err}", RuntimeWarning, stacklevel=2)  # fmt: skip
        else:
            log.info("fused CPU kernels ready in %.2f s (%s)", time.perf_counter() - start, path)
    _state["lib"] = fn
    return fn


def reset() -> None:
    """Forget the loaded library (the next :func:`load` builds or loads it again)."""
    _state.clear()


def usable(model: Any, kv_buffer: torch.Tensor) -> Any:
    """The loaded library when ``model``'s step can run :func:`run_layers`, else None."""
    fn = _state.get("lib")
    if (fn is None or not model.fused_ops or model.spec.qk_norm or torch.get_num_threads() != 1
            or model.dtype != torch.float32 or model.device.type != "cpu"
            or kv_buffer.dtype != torch.float32 or not kv_buffer.is_contiguous()):  # fmt: skip
        return None
    return fn


def add_rms_norm(fn, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:  # fmt: skip
    """``x += delta`` in place (x, delta contiguous float32 ``[T, H]``), returns the RMSNorm of
    the sum times ``weight``, as ``F.rms_norm`` (one kernel call)."""
    out = torch.empty_like(x)
    t, h = x.shape
    fn.add_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(),
                    weight.data_ptr(), out.data_ptr(), t, h, eps)  # fmt: skip
    return out


def silu_mul(fn, gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]`` for contiguous float32 ``[T, 2I]``."""
    t, two_i = gate_up.shape
    out = torch.empty(t, two_i // 2)
    fn.silu_mul(gate_up.data_ptr(), out.data_ptr(), t, two_i // 2)
    return out


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1)`` of float32 CPU ``[R, V]`` (the first of equal maxima; a NaN is the
    largest): one AVX-512 pass where the library runs on one thread (torch's CPU argmax reads
    ~5 GB/s: 0.68 ms for 16 rows of SmolLM2's 49,152 logits), else torch's."""
    fn = _state.get("lib")
    if (fn is None or torch.get_num_threads() != 1 or scores.dtype != torch.float32
            or scores.device.type != "cpu" or scores.dim() != 2 or scores.shape[1] >= 2**31):  # fmt: skip
        return scores.argmax(-1)
    scores = scores.contiguous()
    out = torch.empty(scores.shape[0], dtype=torch.long)
    if scores.shape[1] == 0:
        raise ValueError("argmax of an empty row")
    fn.argmax_rows(scores.data_ptr(), out.data_ptr(), scores.shape[0], scores.shape[1])
    return out


def _check_slots(slots: torch.Tensor, pool_slots: int) -> None:
    # the kernel writes pool rows by these numbers: out of range would write outside the pool
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= pool_slots):
        raise ValueError(f"slot_mapping outside the pool's [0, {pool_slots}) slots")


def run_layers(fn, x: torch.Tensor, layers: list, spec: Any, rope: torch.Tensor,
               slot_mapping: torch.Tensor, kv_buffer: torch.Tensor, plan: Any) -> torch.Tensor:  # fmt: skip
    """The decoder layers of ``CausalLM.step`` with the fused kernels: x ``[T, H]`` (the
    embeddings, written in place) -> the last layer's output ``[T, H]``. Same contract as the
    reference loop: each layer's new K/V written to the pool, then ``plan.attend``."""
    t, hidden = x.shape
    d, hq, hk = spec.head_dim, spec.num_heads, spec.num_kv_heads
    width, row = (hq + 2 * hk) * d, 2 * hk * d
    eps = spec.rms_norm_eps
    slots = slot_mapping.to(torch.long).contiguous()
    _check_slots(slots, kv_buffer.shape[1])
    cs = torch.view_as_real(rope).contiguous()  # [T, 1, D/2, 2]: cos, sin per pair
    if cs.shape != (t, 1, d // 2, 2):
        raise ValueError(f"rope table {tuple(rope.shape)} does not fit {t} tokens, head_dim {d}")
    x = x.contiguous()
    norm, rope_store, act_fn = fn.add_rms_norm, fn.rope_store, fn.silu_mul
    h = torch.empty_like(x)
    inter = spec.intermediate_size
    act = torch.empty(t, inter)
    xp, hp, cp, sp, ap = x.data_ptr(), h.data_ptr(), cs.data_ptr(), slots.data_ptr(), act.data_ptr()
    down = None  # the last layer's MLP output, not yet added to x
    pools = kv_buffer.unbind(0)  # [S, 2, Hk, D] per layer
    # a decode step on the one-pass kernel: bound once, not dispatched and checked per layer
    bound = getattr(plan, "layer_attention", None)
    attend = None if bound is None or not pools else bound(pools[0], hq * d, width)
    for w, pool in zip(layers, pools, strict=True):
        norm(xp, None if down is None else down.data_ptr(), w.input_norm.data_ptr(), hp, t,
             hidden, eps)  # fmt: skip
        qkv = linear(h, w.qkv_weight, w.qkv_bias).contiguous()  # [T, (Hq + 2 Hk) * D]
        rope_store(qkv.data_ptr(), cp, sp, pool.data_ptr(), t, width, hq + hk, hq, row, d)
        if attend is not None:
            attn = attend(qkv, pool)
        else:
            attn = plan.attend(qkv[:, : hq * d], qkv[:, hq * d :].view(t, 2, hk, d), pool)
        out = linear(attn, w.o_weight, w.o_bias).contiguous()
        norm(xp, out.data_ptr(), w.post_norm.data_ptr(), hp, t, hidden, eps)
        gate_up = linear(h, w.gate_up_weight, w.gate_up_bias).contiguous()  # [T, 2 I]
        act_fn(gate_up.data_ptr(), ap, t, inter)
        down = linear(act, w.down_weight, w.down_bias).contiguous()
    return x if down is None else x.add_(down)
