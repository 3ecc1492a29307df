"""Compiled CPU kernels (AVX-512), for what torch's CPU kernels do slowly at decode shapes.

- ``int8_matvec`` (:func:`matvec`): weight-only int8 for 1-4 rows, ``(x @ qweight.T) * scales``
  for float32 ``x [T, K]``, int8 ``qweight [N, K]``, float32 ``scales [N]``: each weight row read
  once, widened to float32 in registers, multiplied into every row of ``x``, float32 sums. No
  bfloat16 rounding: it equals :meth:`.quant.QuantLinear.reference` up to the order of the sums.
  At 1-4 rows a decode step streams every weight once; torch's int8 kernel
  (``_weight_int8pack_mm``) streams int8 at ~6 GB/s, the int4 kernel on two nibble planes at
  ~8 GB/s, this loop at ~12 GB/s: a whole SmolLM2-135M step's int8 matrices at 1 row 10.7-12.3 ms
  against 16.1-16.5 (nibble planes), 23-25 (int8 kernel) and 36-38 ms for float32 (1 thread,
  thread time, AMD EPYC with AVX-512, issue 30). inductor's C++ codegen of the same reduction
  (``torch.compile``) ran at the int8 kernel's speed at 1 row and ~30x slower at 4 rows.
- ``decode_scores`` / ``decode_pv`` (:func:`decode_attention`): a decode step's attention read
  straight from the K/V pool by slot (no gathered, padded copy of every sequence's K/V, which
  was most of the cost: 5 of 7.7 ms a layer at 16 sequences x 1000 tokens), softmax by torch in
  between. Gather + SDPA against this, per layer, SmolLM2 heads (9 q, 3 kv, 64): 16 sequences x
  ~80 tokens 0.34 vs 0.13 ms, 64 x ~80 2.8 vs 0.5 ms, 16 x ~1000 8.6-9.4 vs 3.4-4.0 ms.

C compiled once per machine with the system compiler (``$CC``, default ``cc``;
``-O3 -march=native``, ~0.5 s) into ``$MULTIVERSE_KERNEL_CACHE`` (default
``~/.cache/multiverse/kernels``, the file named by a hash of the source, the flags and the CPU),
then loaded with ctypes; a later process loads the cached library. :func:`load` runs when a CPU
model is made (``CausalLM.__init__``) and logs the compile and its time, so no step pays for it.
Where the CPU lacks AVX-512 nothing is built (torch's kernels run, as before); where the compiler
fails or is missing, one warning and torch's kernels. The kernels are single-threaded: with
``torch.get_num_threads() > 1`` torch's kernels run. Reference paths: ``QuantLinear.reference``
and the attention backends' (``build_attention_plan(native=False)``, ``"reference"``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 4
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 60
SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>
/* out[t, n] = scale[n] * sum_k x[t, k] * w[n, k] for t < T <= 4; float32 sums in 16 lanes. */
void int8_matvec(const float *x, const int8_t *w, const float *scale, float *out,
                 int64_t T, int64_t N, int64_t K) {
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m128i q = _mm_loadu_si128((const __m128i *)(wr + k));
            __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
            a0 = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + k), a0);
            if (T > 1) a1 = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + K + k), a1);
            if (T > 2) a2 = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + 2 * K + k), a2);
            if (T > 3) a3 = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + 3 * K + k), a3);
        }
        float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1),
                      _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3)};
        for (; k < K; k++)
            for (int64_t t = 0; t < T; t++) s[t] += x[t * K + k] * (float)wr[k];
        for (int64_t t = 0; t < T; t++) out[t * N + n] = s[t] * scale[n];
    }
}

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

/* Decode attention straight from the K/V pool (no gathered copy). pool: rows of [2, Hk, D]
   floats; idx [B, L] the slots of each sequence (the first lens[b] are its own); q [B, Hk, G, D]
   (scaled). scores [B, Hk, G, L]: q . k for l < lens[b], -inf after. */
void decode_scores(const float *q, const float *pool, const int64_t *idx, const int64_t *lens,
                   float *scores, int64_t B, int64_t L, int64_t Hk, int64_t G, int64_t D) {
    const int64_t row = 2 * Hk * D;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hk; h++)
            for (int64_t g = 0; g < G; g++) {
                const float *qv = q + ((b * Hk + h) * G + g) * D;
                float *out = scores + ((b * Hk + h) * G + g) * L;
                for (int64_t l = 0; l < L; l++) {
                    if (l >= lens[b]) { out[l] = -__builtin_inff(); continue; }
                    const float *k = pool + idx[b * L + l] * row + h * D;
                    __m512 a = _mm512_setzero_ps();
                    for (int64_t d = 0; d < D; d += 16) {
                        __mmask16 m = lanes(D - d);
                        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qv + d),
                                            _mm512_maskz_loadu_ps(m, k + d), a);
                    }
                    out[l] = _mm512_reduce_add_ps(a);
                }
            }
}

/* out [B, Hk, G, D] = sum_l p[b, h, g, l] v[l], v from the pool (rows as in decode_scores). */
void decode_pv(const float *p, const float *pool, const int64_t *idx, const int64_t *lens,
               float *out, int64_t B, int64_t L, int64_t Hk, int64_t G, int64_t D) {
    const int64_t row = 2 * Hk * D;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hk; h++)
            for (int64_t g = 0; g < G; g++) {
                const float *pr = p + ((b * Hk + h) * G + g) * L;
                float *o = out + ((b * Hk + h) * G + g) * D;
                for (int64_t d = 0; d < D; d += 16) {
                    __mmask16 m = lanes(D - d);
                    __m512 a = _mm512_setzero_ps();
                    for (int64_t l = 0; l < lens[b]; l++) {
                        const float *v = pool + idx[b * L + l] * row + (Hk + h) * D;
                        a = _mm512_fmadd_ps(_mm512_set1_ps(pr[l]), _mm512_maskz_loadu_ps(m, v + d), a);
                    }
                    _mm512_mask_storeu_ps(o + d, m, a);
                }
            }
}
"""

_state: dict[str, object] = {}  # "lib": the loaded library or None, once per process


def supported() -> bool:
    """Whether this CPU runs the kernel (AVX-512 as torch detects it, x86-64)."""
    return (
        platform.machine() in ("x86_64", "AMD64")
        and "AVX512" in torch.backends.cpu.get_cpu_capability()
    )


def cache_dir() -> Path:
    env = os.environ.get("MULTIVERSE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "multiverse" / "kernels"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def build(cc: str | None = None, directory: Path | None = None, source: str = SOURCE,
          stem: str = "cpu_kernels") -> Path:  # fmt: skip
    """Compile ``source`` (default: these kernels) or find it compiled, return the library's
    path (``<stem>-<hash>.so``); raises ``RuntimeError`` with the compiler's message when it
    cannot."""
    cc = cc or os.environ.get("CC") or "cc"
    directory = directory or cache_dir()
    key = hashlib.sha256("\0".join((source, cc, *FLAGS, _cpu_id())).encode()).hexdigest()[:16]
    lib = directory / f"{stem}-{key}.so"
    if lib.exists():
        return lib
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, out = Path(tmp) / f"{stem}.c", Path(tmp) / lib.name
        src.write_text(source)
        try:
            proc = subprocess.run([exe, *FLAGS, str(src), "-o", str(out)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"{cc} took over {COMPILE_TIMEOUT_S} s") from err
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        os.replace(out, lib)  # atomic: a concurrent process sees all of it or nothing
    return lib


def load(cc: str | None = None, directory: Path | None = None):
    """The kernels' library (compiled on first use on this machine, then cached), or None where
    the CPU lacks AVX-512 or it cannot be built (then one warning). Once per process."""
    if "lib" in _state:
        return _state["lib"]
    fn = None
    if not supported():
        log.info("CPU kernels (int8 matvec, decode attention): not built (no AVX-512: %s); torch's kernels run",
                 torch.backends.cpu.get_cpu_capability())  # fmt: skip
    else:
        start = time.perf_counter()
        try:
            lib = build(cc, directory)
            fn = ctypes.CDLL(str(lib))
            ptrs, ints = [ctypes.c_void_p] * 4, [ctypes.c_int64]
            fn.int8_matvec.argtypes = ptrs + ints * 3
            fn.decode_scores.argtypes = fn.decode_pv.argtypes = ptrs + [ctypes.c_void_p] + ints * 5
            for f in (fn.int8_matvec, fn.decode_scores, fn.decode_pv):
                f.restype = None
        except (RuntimeError, OSError, AttributeError) as err:
            warnings.warn(f"CPU kernels unavailable, torch's kernels run instead "
                          f"(slower decode steps): {err}", RuntimeWarning, stacklevel=2)  # fmt: skip
        else:
            log.info(
                "CPU kernels (int8 matvec, decode attention) ready in %.2f s (%s)",
                time.perf_counter() - start,
                lib,
            )
    _state["lib"] = fn
    return fn


def loaded():
    """The library :func:`load` returned in this process (None: not loaded, or unavailable)."""
    return _state.get("lib")


def reset() -> None:
    """Forget the loaded kernel (the next :func:`load` builds or loads it again)."""
    _state.clear()


def matvec(fn, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x @ qweight.T) * scales`` with the loaded kernel ``fn``: x float32 ``[T, K]``
    (T <= :data:`MAX_ROWS`), contiguous int8 ``qweight [N, K]``, float32 ``scales [N]``."""
    t, k = x.shape
    n = qweight.shape[0]
    if t > MAX_ROWS or x.dtype != torch.float32 or qweight.shape[1] != k:
        raise ValueError(f"int8 matvec: x {tuple(x.shape)} {x.dtype} against weight "
                         f"{tuple(qweight.shape)} (float32, at most {MAX_ROWS} rows)")  # fmt: skip
    x = x.contiguous()
    out = torch.empty(t, n, dtype=torch.float32)
    fn.int8_matvec(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), t, n, k)
    return out


def decode_attention(fn, q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One decode step's attention read straight from the pool with the loaded kernels ``fn``:
    q ``[B, Hq * D]`` float32, ``pool [S, 2, Hk, D]`` contiguous float32, ``slots [B * L]`` long
    (sequence b's K/V slots first, then padding), ``lens [B]`` long (1 <= lens[b] <= L) ->
    ``[B, Hq * D]``; query head ``h`` reads KV head ``h // (Hq // Hk)``; float32 softmax."""
    s, _, hk, d = pool.shape
    b = lens.shape[0]
    cols = slots.shape[0] // b
    g = q.shape[1] // (hk * d)
    if (pool.dtype != torch.float32 or q.dtype != torch.float32 or not pool.is_contiguous()
            or cols * b != slots.shape[0] or q.shape != (b, hk * g * d)):  # fmt: skip
        raise ValueError(f"decode attention: q {tuple(q.shape)} {q.dtype}, pool {tuple(pool.shape)} "
                         f"{pool.dtype}, slots {tuple(slots.shape)}, lens {tuple(lens.shape)}")  # fmt: skip
    qs = (q * d**-0.5).contiguous()  # [B, Hk, G, D]
    slots, lens = slots.to(torch.long).contiguous(), lens.to(torch.long).contiguous()
    # the kernel reads pool rows by these numbers: out of range would read outside the pool
    if (
        int(slots.min()) < 0
        or int(slots.max()) >= s
        or int(lens.min()) < 1
        or int(lens.max()) > cols
    ):
        raise ValueError(f"decode attention: slots outside [0, {s}) or lens outside [1, {cols}]")
    scores = torch.empty(b, hk, g, cols)
    args = (pool.data_ptr(), slots.data_ptr(), lens.data_ptr())
    fn.decode_scores(qs.data_ptr(), *args, scores.data_ptr(), b, cols, hk, g, d)
    probs = torch.softmax(scores, -1)
    out = torch.empty(b, hk * g * d)
    fn.decode_pv(probs.data_ptr(), *args, out.data_ptr(), b, cols, hk, g, d)
    return out
