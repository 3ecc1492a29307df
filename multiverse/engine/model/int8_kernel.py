"""A weight-only int8 matrix-vector kernel for 1-4 rows (decode at small batches), AVX-512, CPU.

``matvec(x, qweight, scales)`` = ``(x @ qweight.T) * scales`` for float32 ``x [T, K]`` (T <= 4),
int8 ``qweight [N, K]`` and float32 ``scales [N]``: each weight row is read once, widened to
float32 in registers and multiplied into every row of ``x``, float32 sums (16 lanes, then one
horizontal sum). No bfloat16 rounding: it equals :meth:`.quant.QuantLinear.reference` up to the
order of the float32 sums.

Why: at 1-4 rows a decode step streams every weight from memory once, and torch's int8 kernel
(``_weight_int8pack_mm``) streams int8 at ~6 GB/s, the int4 kernel on two nibble planes at
~8 GB/s, this loop at ~12 GB/s: a whole SmolLM2-135M step's int8 matrices at 1 row 10.7-12.3 ms
against 16.1-16.5 (nibble planes), 23-25 (int8 kernel) and 36-38 ms for float32 (``x @ W^T``;
1 thread, thread time, AMD EPYC with AVX-512, measured for issue 30). inductor's C++ codegen
of the same reduction (``torch.compile``) ran at the int8 kernel's speed at 1 row and ~30x slower
at 4 rows.

It is C compiled once per machine with the system compiler (``$CC``, default ``cc``;
``-O3 -march=native``, ~1 s) into ``$MULTIVERSE_KERNEL_CACHE`` (default
``~/.cache/multiverse/kernels``, the file named by a hash of the source, the flags and the CPU),
then loaded with ctypes; a later process loads the cached library. :func:`load` is called when a
model is quantised (``CausalLM.quantize_``) and logs the compile and its time, so the first
decode step pays nothing. Where the CPU lacks AVX-512 the kernel is not built (the torch kernels
run, as before); where the compiler fails or is missing, one warning and the torch kernels.
The kernel runs single-threaded: with ``torch.get_num_threads() > 1`` the torch kernels run.
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
"""

_state: dict[str, object] = {}  # "fn": the loaded function or None, once per process


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


def build(cc: str | None = None, directory: Path | None = None) -> Path:
    """Compile the kernel (or find it compiled) and return the library's path; raises
    ``RuntimeError`` with the compiler's message when it cannot."""
    cc = cc or os.environ.get("CC") or "cc"
    directory = directory or cache_dir()
    key = hashlib.sha256("\0".join((SOURCE, cc, *FLAGS, _cpu_id())).encode()).hexdigest()[:16]
    lib = directory / f"int8_matvec-{key}.so"
    if lib.exists():
        return lib
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, out = Path(tmp) / "int8_matvec.c", Path(tmp) / lib.name
        src.write_text(SOURCE)
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
    """The kernel's function (compiled on first use on this machine, then cached), or None where
    the CPU lacks AVX-512 or it cannot be built (then one warning). Once per process."""
    if "fn" in _state:
        return _state["fn"]
    fn = None
    if not supported():
        log.info("int8 matvec kernel: not built (no AVX-512: %s); torch's kernels run",
                 torch.backends.cpu.get_cpu_capability())  # fmt: skip
    else:
        start = time.perf_counter()
        try:
            lib = build(cc, directory)
            fn = ctypes.CDLL(str(lib)).int8_matvec
        except (RuntimeError, OSError, AttributeError) as err:
            warnings.warn(f"int8 matvec kernel unavailable, torch's int8 kernels run instead "
                          f"(slower at 1-4 rows): {err}", RuntimeWarning, stacklevel=2)  # fmt: skip
        else:
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
            fn.restype = None
            log.info("int8 matvec kernel ready in %.2f s (%s)", time.perf_counter() - start, lib)
    _state["fn"] = fn
    return fn


def loaded():
    """The function :func:`load` returned in this process (None: not loaded, or unavailable)."""
    return _state.get("fn")


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
    fn(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), t, n, k)
    return out
