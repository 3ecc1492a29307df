"""Compiled CPU kernels (AVX-512; the int8 one AVX2 too), for what torch's CPU kernels do slowly
at decode shapes.

- ``int8_matvec`` (:func:`matvec`): weight-only int8, ``(x @ qweight.T) * scales`` for float32
  ``x [T, K]``, int8 ``qweight [N, K]``, float32 ``scales [N]``: each weight row widened to
  float32 in registers and multiplied into a tile of up to 8 rows of ``x`` (float32
  accumulators, 2-4 chains a row at 1-2 rows; ``ceil(T / 8)`` passes over the weights), from 3
  rows the weights prefetched 2 KiB ahead. No bfloat16 rounding: it equals
  :meth:`.quant.QuantLinear.reference` up to the order of the sums. At one row it streams int8
  at about the core's memory bandwidth (14-16 GB/s; float32 streams at ~14: four weight rows per
  iteration, 64-byte loads widened in parts, or prefetch at 1 row did not stream faster); from
  2 rows the FMAs bound it. A whole SmolLM2-135M step's matrices (1 thread, thread time, AMD
  EPYC with AVX-512; one process, ABBA): 8.3 / 10.9 / 13.2 / 15.5 / 31.5 / 60.3 ms at 1 / 2 / 3
  / 4 / 8 / 16 rows (AVX2 build 9.4 / 12.1 / 13.5 / 16.2 / 30.6 / 58.9; the 1-4 row loop before
  9.2 / 12.8 / 14.9 / 18.5). Against float32 (:mod:`.packed`) and torch's bfloat16 int8
  kernels (nibble planes to 4 rows, then ``_weight_int8pack_mm``), a run before the chains: 1
  row 10.4 / 35.6 / 16.9 ms, 4 rows 15.6 / 37.7 / 28.4, 5 rows 18.5 / 35.8 / 40.5, 8 rows 31.0
  / 45.7 / 48.4, 12 rows 42.6 / 52.1 / 67.4, 16 rows 60.0 / 62.3 / 84.1. The engine takes it to
  :data:`MAX_ROWS` rows.
- ``decode_scores`` / ``decode_pv`` (:func:`decode_attention`): a decode step's attention read
  straight from the K/V pool by slot (no gathered, padded copy of every sequence's K/V, which
  was most of the cost: 5 of 7.7 ms a layer at 16 sequences x 1000 tokens), softmax by torch in
  between. Gather + SDPA against this, per layer, SmolLM2 heads (9 q, 3 kv, 64): 16 sequences x
  ~80 tokens 0.34 vs 0.13 ms, 64 x ~80 2.8 vs 0.5 ms, 16 x ~1000 8.6-9.4 vs 3.4-4.0 ms.

C compiled once per machine with the system compiler (``$CC``, default ``cc``;
``-O3 -march=native``, ~0.5 s; the instruction set picked from torch's CPU capability: AVX-512
builds every kernel, AVX2 + FMA the int8 one only, ``-mno-avx512f`` builds that one on an AVX-512
CPU too) into ``$MULTIVERSE_KERNEL_CACHE`` (default
``~/.cache/multiverse/kernels``, the file named by a hash of the source, the flags and the CPU),
then loaded with ctypes; a later process loads the cached library. :func:`load` runs when a CPU
model is made (``CausalLM.__init__``) and logs the compile and its time, so no step pays for it.
Where the CPU lacks AVX2 nothing is built (torch's kernels run, as before; without
AVX-512, torch's decode attention); where the compiler
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

MAX_ROWS = 16
FLAGS = ("-O3", "-shared", "-fPIC")
# per instruction set: -march=native on an AVX2-only CPU targets AVX2 already; "avx2" on an
# AVX-512 CPU (tests/engine/test_cpu_kernels.py) turns AVX-512 off
ISA_FLAGS = {"avx512": ("-march=native",), "avx2": ("-march=native", "-mno-avx512f")}
COMPILE_TIMEOUT_S = 60
SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>
/* int8 matvec: out[t, n] = scale[n] * sum_k x[t, k] * w[n, k], float32 sums in VL lanes. One
   weight row at a time against a tile of TT <= 8 rows of x (one accumulator each: TT FMAs per
   widened weight vector), the tiles one after another; from 3 rows the weights 2 KiB ahead
   prefetched (once a cache line; at 1-2 rows that was slower). AVX-512 (16 lanes) where the compiler targets it, else AVX2 + FMA (8). */
#define PREFETCH 2048
#if defined(__AVX512F__)
#define ISA 512
#define VL 16
typedef __m512 vf;
#define VZERO() _mm512_setzero_ps()
#define VLOADX(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUM(v) _mm512_reduce_add_ps(v)
#define WIDEN(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 256
#define VL 8
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VLOADX(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define WIDEN(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
static inline float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "the CPU kernels need AVX-512 F or AVX2 + FMA"
#endif

int kernel_isa(void) { return ISA; }

/* U accumulator chains a row of x: one chain waits on the FMA latency at 1-2 rows (AVX-512), 1-4
   (AVX2); U = 4 at one row was slower with AVX-512 (13.8 vs 7.9 ms a SmolLM2 step) */
#define INT8_TILE(TT, U)                                                                        \
static void int8_tile_##TT(const float *x, const int8_t *w, const float *scale, float *out,     \
                           int64_t N, int64_t K, const int8_t *end) {                           \
    for (int64_t n = 0; n < N; n++) {                                                           \
        const int8_t *wr = w + n * K;                                                           \
        vf acc[U][TT];                                                                          \
        for (int u = 0; u < U; u++)                                                             \
            for (int t = 0; t < TT; t++) acc[u][t] = VZERO();                                   \
        int64_t k = 0;                                                                          \
        for (; k + (U) * VL <= K; k += (U) * VL) {                                              \
            const int8_t *ahead = wr + k + PREFETCH;                                            \
            if (TT >= 3 && ((uintptr_t)ahead & 63) < (U) * VL && ahead < end)                   \
                _mm_prefetch((const char *)ahead, _MM_HINT_T0);                                 \
            for (int u = 0; u < U; u++) {                                                       \
                vf wf = WIDEN(wr + k + u * VL);                                                 \
                for (int t = 0; t < TT; t++)                                                    \
                    acc[u][t] = VFMA(wf, VLOADX(x + t * K + k + u * VL), acc[u][t]);            \
            }                                                                                   \
        }                                                                                       \
        for (; k + VL <= K; k += VL) {                                                          \
            vf wf = WIDEN(wr + k);                                                              \
            for (int t = 0; t < TT; t++) acc[0][t] = VFMA(wf, VLOADX(x + t * K + k), acc[0][t]);\
        }                                                                                       \
        for (int t = 0; t < TT; t++) {                                                          \
            for (int u = 1; u < U; u++) acc[0][t] = VADD(acc[0][t], acc[u][t]);                 \
            float s = VSUM(acc[0][t]);                                                          \
            for (int64_t j = k; j < K; j++) s += x[t * K + j] * (float)wr[j];                   \
            out[t * N + n] = s * scale[n];                                                      \
        }                                                                                       \
    }                                                                                           \
}
INT8_TILE(1, (VL == 8 ? 4 : 2)) INT8_TILE(2, 2) INT8_TILE(3, (VL == 8 ? 2 : 1))
INT8_TILE(4, (VL == 8 ? 2 : 1))
INT8_TILE(5, 1) INT8_TILE(6, 1) INT8_TILE(7, 1) INT8_TILE(8, 1)
typedef void (*int8_tile)(const float *, const int8_t *, const float *, float *, int64_t,
                          int64_t, const int8_t *);
static const int8_tile INT8_TILES[8] = {int8_tile_1, int8_tile_2, int8_tile_3, int8_tile_4,
                                        int8_tile_5, int8_tile_6, int8_tile_7, int8_tile_8};

/* T rows of x in ceil(T / 8) passes over the weights, tiles of equal size (12: 6 + 6) */
void int8_matvec(const float *x, const int8_t *w, const float *scale, float *out,
                 int64_t T, int64_t N, int64_t K) {
    const int8_t *end = w + N * K;
    int64_t passes = (T + 7) / 8;
    for (int64_t t0 = 0, p = 0; p < passes; p++) {
        int64_t tt = (T - t0 + (passes - p) - 1) / (passes - p);
        INT8_TILES[tt - 1](x + t0 * K, w, scale, out + t0 * N, N, K, end);
        t0 += tt;
    }
}

#if defined(__AVX512F__)
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
#endif
"""

_state: dict[str, object] = {}  # "lib": the loaded library or None, once per process


def cpu_isa() -> str | None:
    """The instruction set the kernels are built for on this CPU (as torch detects it, x86-64):
    ``"avx512"`` (int8 matvec and decode attention), ``"avx2"`` (int8 matvec only), or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return "avx512" if "AVX512" in capability else "avx2" if "AVX2" in capability else None


def supported() -> bool:
    """Whether this CPU runs every kernel, the decode attention's too (AVX-512)."""
    return cpu_isa() == "avx512"


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


def build(cc: str | None = None, directory: Path | None = None, isa: str | None = None) -> Path:
    """Compile the kernels for ``isa`` (default :func:`cpu_isa`; ``"avx2"`` builds the AVX2
    variant on an AVX-512 CPU too) or find them compiled, and return the library's path; raises
    ``RuntimeError`` with the compiler's message when it cannot."""
    cc = cc or os.environ.get("CC") or "cc"
    directory = directory or cache_dir()
    isa = isa or cpu_isa()
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"no CPU kernels for isa={isa!r} (this CPU: {cpu_isa()}); "
                           f"one of {tuple(ISA_FLAGS)}")  # fmt: skip
    flags = (*FLAGS, *ISA_FLAGS[isa])
    key = hashlib.sha256("\0".join((SOURCE, cc, *flags, _cpu_id())).encode()).hexdigest()[:16]
    lib = directory / f"cpu_kernels-{isa}-{key}.so"
    if lib.exists():
        return lib
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, out = Path(tmp) / "cpu_kernels.c", Path(tmp) / lib.name
        src.write_text(SOURCE)
        try:
            proc = subprocess.run([exe, *flags, str(src), "-o", str(out)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"{cc} took over {COMPILE_TIMEOUT_S} s") from err
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        os.replace(out, lib)  # atomic: a concurrent process sees all of it or nothing
    return lib


def open_library(path: Path):
    """The compiled library at ``path`` (:func:`build`) with its functions' signatures set;
    ``lib.kernel_isa()`` is 512 or 256, the decode attention kernels there at 512 only."""
    fn = ctypes.CDLL(str(path))
    ptrs, ints = [ctypes.c_void_p] * 4, [ctypes.c_int64]
    fn.kernel_isa.argtypes, fn.kernel_isa.restype = [], ctypes.c_int
    fn.int8_matvec.argtypes, fn.int8_matvec.restype = ptrs + ints * 3, None
    if fn.kernel_isa() == 512:
        fn.decode_scores.argtypes = fn.decode_pv.argtypes = ptrs + [ctypes.c_void_p] + ints * 5
        fn.decode_scores.restype = fn.decode_pv.restype = None
    return fn


def load(cc: str | None = None, directory: Path | None = None):
    """The kernels' library for this CPU (compiled on first use on this machine, then cached),
    or None where the CPU has neither AVX-512 nor AVX2 or it cannot be built (then one warning).
    Once per process."""
    if "lib" in _state:
        return _state["lib"]
    fn, isa = None, cpu_isa()
    if isa is None:
        log.info("CPU kernels (int8 matvec, decode attention): not built (no AVX2: %s); torch's kernels run",
                 torch.backends.cpu.get_cpu_capability())  # fmt: skip
    else:
        start = time.perf_counter()
        try:
            lib = build(cc, directory, isa)
            fn = open_library(lib)
        except (RuntimeError, OSError, AttributeError) as err:
            warnings.warn(f"CPU kernels unavailable, torch's kernels run instead "
                          f"(slower decode steps): {err}", RuntimeWarning, stacklevel=2)  # fmt: skip
        else:
            what = "int8 matvec, decode attention" if isa == "avx512" else "int8 matvec (AVX2)"
            log.info(
                "CPU kernels (%s) ready in %.2f s (%s)", what, time.perf_counter() - start, lib
            )
    _state["lib"] = fn
    return fn


def loaded():
    """The library :func:`load` returned in this process where it has the decode attention
    kernels (AVX-512); None: not loaded, unavailable, or AVX2 (:func:`int8_library`)."""
    fn = _state.get("lib")
    return fn if fn is not None and fn.kernel_isa() == 512 else None


def int8_library():
    """The library :func:`load` returned in this process, for :func:`matvec` (AVX-512 or AVX2);
    None: not loaded, or unavailable."""
    return _state.get("lib")


def reset() -> None:
    """Forget the loaded kernel (the next :func:`load` builds or loads it again)."""
    _state.clear()


def matvec(fn, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x @ qweight.T) * scales`` with the loaded kernel ``fn`` (:func:`int8_library`): x
    float32 ``[T, K]`` (any T; the engine takes it up to :data:`MAX_ROWS`), contiguous int8
    ``qweight [N, K]``, float32 ``scales [N]``."""
    t, k = x.shape
    n = qweight.shape[0]
    if x.dtype != torch.float32 or qweight.dtype != torch.int8 or qweight.shape[1] != k:
        raise ValueError(f"int8 matvec: x {tuple(x.shape)} {x.dtype} against weight "
                         f"{tuple(qweight.shape)} {qweight.dtype} (float32 x, int8 weight)")  # fmt: skip
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
