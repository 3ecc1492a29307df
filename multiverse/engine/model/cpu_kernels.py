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
- ``decode_attend`` (:func:`.attention.native.decode_attention`): a decode step's attention
  read straight from the K/V pool by slot (no gathered, padded copy) in one pass: per block of
  keys that fits L1, every query head's scores, an online softmax (running max and sum) and the
  values, so each K/V row is read from memory once; a shared prefix (forked paths) once for all
  its rows. While a block computes, the next block's rows are prefetched into L2, across the end
  of a segment too (16 sequences x 50-95 keys, 30 layers of a cold pool: 4.4-4.6 -> 3.7-3.8
  ms with the next sequence's first block prefetched). Per layer at SmolLM2's heads (9 q, 3 kv, 64), 1 thread, thread time, against the
  earlier two-pass kernel (scores, torch softmax, values): 16 sequences x ~80 tokens 0.088 vs
  0.138 ms, 64 x ~80 0.35 vs 0.49 ms, 16 x ~1000 1.28 vs 2.9-3.0 ms (~19 GB/s of K/V, where
  a sequential read runs at ~28 GB/s); gather + SDPA took 0.34, 2.8 and 8.6-9.4 ms.

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

from multiverse.engine.model.cpu_source import SOURCE

log = logging.getLogger(__name__)

MAX_ROWS = 16
FLAGS = ("-O3", "-shared", "-fPIC")
# per instruction set: -march=native on an AVX2-only CPU targets AVX2 already; "avx2" on an
# AVX-512 CPU (tests/engine/test_cpu_kernels.py) turns AVX-512 off
ISA_FLAGS = {"avx512": ("-march=native",), "avx2": ("-march=native", "-mno-avx512f")}
COMPILE_TIMEOUT_S = 60

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


def build(cc: str | None = None, directory: Path | None = None, isa: str | None = None,
          source: str = SOURCE, stem: str = "cpu_kernels") -> Path:  # fmt: skip
    """Compile ``source`` (default: these kernels) for ``isa`` (default :func:`cpu_isa`;
    ``"avx2"`` builds the AVX2 variant on an AVX-512 CPU too) or find it compiled, and return the
    library's path (``<stem>-<isa>-<hash>.so``); raises ``RuntimeError`` with the compiler's
    message when it cannot."""
    cc = cc or os.environ.get("CC") or "cc"
    directory = directory or cache_dir()
    isa = isa or cpu_isa()
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"no CPU kernels for isa={isa!r} (this CPU: {cpu_isa()}); "
                           f"one of {tuple(ISA_FLAGS)}")  # fmt: skip
    flags = (*FLAGS, *ISA_FLAGS[isa])
    key = hashlib.sha256("\0".join((source, cc, *flags, _cpu_id())).encode()).hexdigest()[:16]
    lib = directory / f"{stem}-{isa}-{key}.so"
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
        fn.decode_attend.argtypes = ptrs + ptrs[:2] + ints * 6 + [ctypes.c_float]
        fn.decode_attend.restype = ctypes.c_int
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
