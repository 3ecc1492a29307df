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
- ``decode_attend`` (:func:`.attention.native.decode_attention`): a decode step's attention
  read straight from the K/V pool by slot (no gathered, padded copy) in one pass: per block of
  keys that fits L1, every query head's scores, an online softmax (running max and sum) and the
  values, so each K/V row is read from memory once; a shared prefix (forked paths) once for all
  its rows. Per layer at SmolLM2's heads (9 q, 3 kv, 64), 1 thread, thread time, against the
  earlier two-pass kernel (scores, torch softmax, values): 16 sequences x ~80 tokens 0.088 vs
  0.138 ms, 64 x ~80 0.35 vs 0.49 ms, 16 x ~1000 1.28 vs 2.9-3.0 ms (~19 GB/s of K/V, where
  a sequential read runs at ~28 GB/s); gather + SDPA took 0.34, 2.8 and 8.6-9.4 ms.

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
#include <stdlib.h>
#include <string.h>
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

/* Decode attention in one pass (flash-decoding style) straight from the K/V pool: each key row
   is read once, its K for the scores and its V for the outputs while it is in cache, with an
   online softmax (running max m, sum l, unnormalised output per query head).
   pool: rows of [2, Hk, D] floats; out [N, Hk, G, D]; q the same with rows qstride floats
   apart (unscaled: scale applied here).
   segs [S, 4]: (slot_lo, slot_hi, row_lo, row_hi): the query rows rows[row_lo:row_hi] attend the
   keys at slots[slot_lo:slot_hi]; a row may take part in several segments (a shared prefix read
   once for all its rows, then its own keys). C = ceil(D / 16) <= 8, the last chunk masked. */
static inline __m512 exp_ps(__m512 x) {  /* e^x, x <= 0: 2^n p(r), |r| <= ln2 / 2, degree 7 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* One block of n <= BL keys (slots ks) for the R rows rr of a segment; sc: [R, H, BL] scratch. */
static inline __attribute__((always_inline)) void attend_block(
        const int C, const float *q, int64_t qstride, const float *pool, const int64_t *ks, int64_t n,
        const int64_t *rr, int64_t R, float *sc, float *m, float *l, float *out, int64_t BL,
        int64_t Hk, int64_t G, int64_t D, float scale, __mmask16 tail, int64_t ahead) {
    const int64_t row = 2 * Hk * D, H = Hk * G;
    for (int64_t j = 0; j < n; j++) {  /* scores: q . k of every (row, head) */
        const float *kr = pool + ks[j] * row;
        if (j < ahead)  /* the next block's rows into L2, while this one computes */
            for (int64_t b = 0; b < row * 4; b += 64) _mm_prefetch((const char *)(pool + ks[n + j] * row) + b, _MM_HINT_T1);
        for (int64_t h = 0; h < Hk; h++) {
            __m512 k[8];
            for (int c = 0; c < C; c++)
                k[c] = c == C - 1 ? _mm512_maskz_loadu_ps(tail, kr + h * D + 16 * c)
                                  : _mm512_loadu_ps(kr + h * D + 16 * c);
            for (int64_t r = 0; r < R; r++)
                for (int64_t g = 0; g < G; g++) {
                    const float *qv = q + rr[r] * qstride + (h * G + g) * D;
                    __m512 a = _mm512_mul_ps(k[0], C == 1 ? _mm512_maskz_loadu_ps(tail, qv)
                                                          : _mm512_loadu_ps(qv));
                    for (int c = 1; c < C; c++)
                        a = _mm512_fmadd_ps(k[c], c == C - 1 ? _mm512_maskz_loadu_ps(tail, qv + 16 * c)
                                                             : _mm512_loadu_ps(qv + 16 * c), a);
                    sc[(r * H + h * G + g) * BL + j] = _mm512_reduce_add_ps(a) * scale;
                }
        }
    }
    __mmask16 left = n % 16 ? (__mmask16)((1u << (n % 16)) - 1) : 0xFFFF;
    for (int64_t r = 0; r < R; r++)  /* online softmax: new max, rescale, p = e^(s - m) */
        for (int64_t hg = 0; hg < H; hg++) {
            float *s = sc + (r * H + hg) * BL;
            const int64_t at = rr[r] * H + hg;
            __m512 mx = _mm512_set1_ps(-__builtin_inff());
            for (int64_t j = 0; j < n; j += 16)
                mx = _mm512_mask_max_ps(mx, j + 16 <= n ? 0xFFFF : left, mx, _mm512_loadu_ps(s + j));
            float mnew = _mm512_reduce_max_ps(mx);
            if (mnew < m[at]) mnew = m[at];
            __m512 mv = _mm512_set1_ps(mnew), sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j += 16) {
                __mmask16 lm = j + 16 <= n ? 0xFFFF : left;
                __m512 p = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lm, s + j), mv));
                sum = _mm512_mask_add_ps(sum, lm, sum, p);
                _mm512_mask_storeu_ps(s + j, lm, p);
            }
            float alpha = m[at] == -__builtin_inff() ? 0.f
                          : _mm512_cvtss_f32(exp_ps(_mm512_set1_ps(m[at] - mnew)));
            l[at] = l[at] * alpha + _mm512_reduce_add_ps(sum);
            m[at] = mnew;
            if (alpha != 1.f) {
                float *o = out + at * D;
                for (int c = 0; c < C; c++) {
                    __mmask16 cm = c == C - 1 ? tail : 0xFFFF;
                    _mm512_mask_storeu_ps(o + 16 * c, cm, _mm512_mul_ps(_mm512_maskz_loadu_ps(cm, o + 16 * c),
                                                                        _mm512_set1_ps(alpha)));
                }
            }
        }
    for (int64_t r = 0; r < R; r++)  /* out += p v, the block's V rows (in cache) */
        for (int64_t h = 0; h < Hk; h++)
            for (int64_t g = 0; g < G; g++) {
                const int64_t at = rr[r] * H + h * G + g;
                const float *p = sc + (r * H + h * G + g) * BL;
                float *o = out + at * D;
                __m512 a[8];
                for (int c = 0; c < C; c++)
                    a[c] = _mm512_maskz_loadu_ps(c == C - 1 ? tail : 0xFFFF, o + 16 * c);
                for (int64_t j = 0; j < n; j++) {
                    const float *v = pool + ks[j] * row + (Hk + h) * D;
                    __m512 pj = _mm512_set1_ps(p[j]);
                    for (int c = 0; c < C; c++)
                        a[c] = _mm512_fmadd_ps(pj, c == C - 1 ? _mm512_maskz_loadu_ps(tail, v + 16 * c)
                                                              : _mm512_loadu_ps(v + 16 * c), a[c]);
                }
                for (int c = 0; c < C; c++)
                    _mm512_mask_storeu_ps(o + 16 * c, c == C - 1 ? tail : 0xFFFF, a[c]);
            }
}

int decode_attend(const float *q, const float *pool, const int64_t *slots, const int64_t *segs,
                  const int64_t *rows, float *out, int64_t N, int64_t S, int64_t Hk, int64_t G,
                  int64_t D, int64_t qstride, float scale) {
    const int64_t H = Hk * G, C = (D + 15) / 16, row = 2 * Hk * D;
    if (C > 8) return -1;
    int64_t BL = 24576 / (row * 4), maxr = 1;  /* a block's K/V rows fit a 32 KiB L1 */
    BL = BL < 8 ? 8 : BL > 128 ? 128 : BL;
    for (int64_t s = 0; s < S; s++)
        if (segs[4 * s + 3] - segs[4 * s + 2] > maxr) maxr = segs[4 * s + 3] - segs[4 * s + 2];
    float *m = malloc(sizeof(float) * N * H), *l = malloc(sizeof(float) * N * H);
    float *sc = malloc(sizeof(float) * maxr * H * BL);
    if (!m || !l || !sc) { free(m); free(l); free(sc); return -2; }
    for (int64_t i = 0; i < N * H; i++) { m[i] = -__builtin_inff(); l[i] = 0.f; }
    memset(out, 0, sizeof(float) * N * H * D);
    __mmask16 tail = lanes(D - 16 * (C - 1));
    for (int64_t s = 0; s < S; s++) {
        const int64_t *sg = segs + 4 * s, *rr = rows + sg[2], R = sg[3] - sg[2];
        for (int64_t k0 = sg[0]; k0 < sg[1]; k0 += BL) {
            int64_t n = sg[1] - k0 < BL ? sg[1] - k0 : BL;
            int64_t ahead = sg[1] - k0 - n < BL ? sg[1] - k0 - n : BL;
            switch (C) {
#define CASE(c) case c: attend_block(c, q, qstride, pool, slots + k0, n, rr, R, sc, m, l, out, BL, Hk, G, D, scale, tail, ahead); break;
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
            }
        }
    }
    for (int64_t i = 0; i < N * H; i++) {  /* normalise; l > 0 for every row with a key */
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        for (int64_t d = 0; d < D; d++) out[i * D + d] *= inv;
    }
    free(m); free(l); free(sc);
    return 0;
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
            fn.decode_attend.argtypes = ptrs + ptrs[:2] + ints * 6 + [ctypes.c_float]
            fn.decode_attend.restype = ctypes.c_int
            fn.int8_matvec.restype = None
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
