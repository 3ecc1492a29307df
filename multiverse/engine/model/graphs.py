"""Decode steps as replays of captured graphs: batch and K/V-length buckets over static buffers.

:class:`DecodeGraphs` owns, per batch bucket ``B`` and K/V-length bucket ``L``, one captured
decode step (:meth:`CausalLM.step` with a :class:`~.attention.static.StaticDecodePlan`) whose
inputs are fixed device buffers:

- ``ints[B] [4, B]`` long: token ids, positions, output slots and K/V lengths of the rows;
- ``kv_flat [max_batch * max_kv]`` long, shared by every bucket: the rows' K/V slots
  concatenated (the bucket reads its first ``B * L`` entries).

A step with ``n`` sequences whose longest K/V list is ``m`` runs in the smallest bucket with
``B >= n`` and ``L >= m``; rows ``n..B-1`` are padding: token 0 at position 0, length 0, written
to the *scratch slot* (a pool slot the engine's allocator never hands out) and attending only
it, so no padding row touches a live slot. A step over the largest bucket returns ``None``: the
caller runs it eagerly, as it does a step whose bucket failed to capture.

How a step is captured is a :class:`Capturer`: :class:`CudaGraphCapturer` (``torch.cuda``
graphs, one shared memory pool) on CUDA, :class:`EagerCapturer` (the "replay" is the same
function run again) anywhere, which is how the tests drive the whole path without CUDA.

Fail safe: a bucket whose capture raises (out of memory, an unsupported operation) is logged
once, with the bucket and the cause, and its steps run eagerly (:meth:`DecodeGraphs.run`
returns None for it); the other buckets keep their graphs. :meth:`DecodeGraphs.capture_all`
(start-up) logs one line with the capture time and the memory the graphs hold
(:class:`CaptureReport`). :func:`bucket_limits` caps the largest bucket at what the engine can
ever run: no more rows than a step can schedule, no longer K/V list than the pool holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from multiverse.engine.model.attention.static import StaticDecodePlan

if TYPE_CHECKING:
    from multiverse.engine.model.causal_lm import CausalLM

Replay = Callable[[], torch.Tensor]
Bucket = tuple[int, int]  # (batch size B, K/V length L)

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_KV = 16384
SMALLEST_KV_BUCKET = 256


class Capturer(Protocol):
    """Turns the step function of ``bucket``'s static buffers into a replay returning its output
    tensor; raises when it cannot (the bucket then runs eagerly)."""

    def capture(self, fn: Callable[[], torch.Tensor], bucket: Bucket) -> Replay: ...


class EagerCapturer:
    """No graph: a replay runs ``fn`` again (CPU, tests). Counts captures and replays."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor], bucket: Bucket) -> Replay:
        self.captures += 1

        def replay() -> torch.Tensor:
            self.replays += 1
            return fn()

        return replay


class CudaGraphCapturer:
    """``torch.cuda.CUDAGraph`` capture after a warm-up on a side stream; all graphs share one
    memory pool (only one replays at a time). The output tensor is the graph's own: valid until
    the next replay of any graph."""

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        self.device = device
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor], bucket: Bucket) -> Replay:
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    fn()
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()
        except BaseException:
            torch.cuda.set_stream(current)  # a failing capture_end skips torch.cuda.graph's stream exit
            raise
        self.captures += 1

        def replay() -> torch.Tensor:
            self.replays += 1
            graph.replay()
            return out

        return replay


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to ``max_batch`` (itself the last bucket)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out = [b for b in (1, 2, 4, 8) if b < max_batch]
    out += list(range(16, max_batch, 8))
    return out + [max_batch]


def kv_buckets(max_kv: int, smallest: int = SMALLEST_KV_BUCKET) -> list[int]:
    """Powers of two from ``smallest`` below ``max_kv``, then ``max_kv`` itself."""
    if max_kv < 1:
        raise ValueError(f"max_kv must be >= 1, got {max_kv}")
    out, b = [], smallest
    while b < max_kv:
        out.append(b)
        b *= 2
    return out + [max_kv]


def pick(buckets: Sequence[int], need: int) -> int | None:
    """The smallest bucket ``>= need`` (None: over the largest)."""
    for b in buckets:
        if b >= need:
            return b
    return None


def bucket_limits(num_slots: int, max_rows: int, max_batch: int | None = None,
                  max_kv: int | None = None) -> Bucket:  # fmt: skip
    """The largest bucket worth capturing for an engine whose allocator hands out ``num_slots``
    slots and whose steps schedule at most ``max_rows`` tokens: ``max_batch`` (default
    :data:`DEFAULT_MAX_BATCH`) capped at ``max_rows`` and ``num_slots`` (every decode row writes
    its own new slot), ``max_kv`` (default :data:`DEFAULT_MAX_KV`) capped at ``num_slots`` (a K/V
    list holds distinct slots). A bigger bucket could never be filled."""
    if num_slots < 1 or max_rows < 1:
        raise ValueError(f"num_slots and max_rows must be >= 1, got {num_slots} and {max_rows}")
    for name, v in (("graph_max_batch", max_batch), ("graph_max_kv", max_kv)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer (or None: the default), got {v!r}")
    b = min(max_batch or DEFAULT_MAX_BATCH, max_rows, num_slots)
    return b, min(max_kv or DEFAULT_MAX_KV, num_slots)


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@dataclass(frozen=True, slots=True)
class CaptureReport:
    """What :meth:`DecodeGraphs.capture_all` did: how many of the ``buckets`` it captured, those
    that failed (bucket -> cause; they run eagerly), how long it took, and the memory the graphs
    hold: ``static_bytes`` (the fixed input and output buffers) plus ``device_bytes`` (CUDA
    memory reserved during the capture: the graphs' pool; 0 off CUDA)."""

    buckets: int
    captured: int
    seconds: float
    static_bytes: int
    device_bytes: int
    failed: dict[Bucket, str] = field(default_factory=dict)

    @property
    def held_bytes(self) -> int:
        return self.static_bytes + self.device_bytes

    def line(self, graphs: DecodeGraphs) -> str:
        """The start-up log line."""
        shape = f"batch {graphs.batch_buckets[0]}..{graphs.max_batch}, K/V {graphs.kv_buckets[0]}..{graphs.max_kv}"
        pool = (f"CUDA memory reserved by the capture {_size(self.device_bytes)}" if graphs.device.type == "cuda"
                else "no device memory pool")  # fmt: skip
        text = (f"decode graphs: captured {self.captured} of {self.buckets} buckets ({shape}) in "
                f"{self.seconds:.2f} s; they hold {_size(self.held_bytes)} (static buffers "
                f"{_size(self.static_bytes)}, {pool})")  # fmt: skip
        if self.failed:
            names = ", ".join(f"{b}x{n}" for b, n in self.failed)
            text += f"; {len(self.failed)} run eagerly (capture failed, see the warnings): {names}"
        return text


def _reserved(device: torch.device) -> int:
    """Bytes the CUDA caching allocator holds on ``device`` once its free cached blocks are
    released (each ``torch.cuda.graph`` capture releases them too; a graph pool's stay): 0 off
    CUDA."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``kv_buffer`` (``KVPool.kv``), one per bucket."""

    def __init__(self, model: CausalLM, kv_buffer: torch.Tensor, scratch_slot: int, *,
                 max_batch: int = DEFAULT_MAX_BATCH, max_kv: int = DEFAULT_MAX_KV,
                 capturer: Capturer | None = None, fold_gqa: bool | None = None) -> None:  # fmt: skip
        if not 0 <= scratch_slot < kv_buffer.shape[1]:
            raise ValueError(f"scratch slot {scratch_slot} is outside the pool ({kv_buffer.shape[1]} slots)")
        self.model = model
        self.kv_buffer = kv_buffer
        self.scratch_slot = scratch_slot
        self.device = kv_buffer.device
        self.batch_buckets = batch_buckets(max_batch)
        self.kv_buckets = kv_buckets(max_kv)
        self.capturer: Capturer = capturer or (
            CudaGraphCapturer(self.device) if self.device.type == "cuda" else EagerCapturer()
        )
        self.fold_gqa = self.device.type == "cuda" if fold_gqa is None else fold_gqa
        self.kv_flat = torch.full((max_batch * max_kv,), scratch_slot, dtype=torch.long, device=self.device)
        # every bucket's logits land here (graph outputs would otherwise each hold [B, vocab])
        self.logits = torch.zeros(max_batch, model.vocab_size, dtype=torch.float32, device=self.device)
        self._ints: dict[int, torch.Tensor] = {}
        for b in self.batch_buckets:
            self.ints(b)
        self._replays: dict[Bucket, Replay] = {}
        self.failed: dict[Bucket, str] = {}  # buckets whose capture raised (they run eagerly): the cause
        self.report: CaptureReport | None = None  # capture_all's
        self.pin = self.device.type == "cuda"

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    @property
    def max_kv(self) -> int:
        return self.kv_buckets[-1]

    def bucket(self, num_rows: int, longest: int) -> tuple[int, int] | None:
        """The ``(B, L)`` bucket a step of ``num_rows`` sequences, the longest attending
        ``longest`` slots, runs in; None when it fits none (run it eagerly)."""
        b, n = pick(self.batch_buckets, num_rows), pick(self.kv_buckets, longest)
        return None if b is None or n is None else (b, n)

    def ints(self, b: int) -> torch.Tensor:
        """The ``[4, b]`` input buffer of batch bucket ``b`` (padding values by default)."""
        buf = self._ints.get(b)
        if buf is None:
            buf = torch.zeros(4, b, dtype=torch.long, device=self.device)
            buf[2] = self.scratch_slot  # ids 0, positions 0, output slot scratch, length 0
            self._ints[b] = buf
        return buf

    @property
    def static_bytes(self) -> int:
        """Bytes of the fixed buffers every bucket reads and writes (inputs and logits)."""
        return sum(t.nbytes for t in (self.kv_flat, self.logits, *self._ints.values()))

    def replay_fn(self, b: int, cols: int) -> Replay | None:
        """The captured step of bucket ``(b, cols)`` (captured on first use); None when its
        capture failed (logged once, with the cause: the bucket runs eagerly)."""
        key = (b, cols)
        if key in self.failed:
            return None
        if key not in self._replays:
            ints, kv_flat = self.ints(b), self.kv_flat[: b * cols]
            model, kv, scratch, fold = self.model, self.kv_buffer, self.scratch_slot, self.fold_gqa
            out = self.logits[:b]

            def step() -> torch.Tensor:
                plan = StaticDecodePlan.build(kv_flat, ints[3], cols, scratch, fold)
                return out.copy_(model.step(ints[0], ints[1], ints[2], kv, plan, None))

            ints[:, :] = 0
            ints[2] = scratch  # capture and warm-up write only the scratch slot
            try:
                self._replays[key] = self.capturer.capture(step, key)
            except Exception as e:  # noqa: BLE001 - out of memory, an op a graph cannot hold: run it eagerly
                cause = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                self.failed[key] = cause
                log.warning("decode graph bucket batch %d x K/V %d: capture failed (%s); its steps run "
                            "eagerly, the other buckets keep their graphs", b, cols, cause, exc_info=True)  # fmt: skip
                return None
        return self._replays[key]

    @torch.inference_mode()
    def capture_all(self) -> CaptureReport:
        """Capture every bucket now (start-up), log one line (time, memory held, failures) and
        return it as a :class:`CaptureReport` (also kept as :attr:`report`)."""
        t0, before = time.perf_counter(), _reserved(self.device)
        for b in self.batch_buckets:
            for cols in self.kv_buckets:
                self.replay_fn(b, cols)
        self.report = CaptureReport(
            buckets=len(self.batch_buckets) * len(self.kv_buckets), captured=len(self._replays),
            seconds=time.perf_counter() - t0, static_bytes=self.static_bytes,
            device_bytes=max(0, _reserved(self.device) - before), failed=dict(self.failed),
        )  # fmt: skip
        log.info(self.report.line(self))
        return self.report

    @torch.inference_mode()
    def run(self, rows: Sequence[Sequence[int]], kv_parts: Sequence[Sequence[torch.Tensor | list[int]]],
            ) -> torch.Tensor | None:  # fmt: skip
        """One decode step. ``rows[i] = (token id, position, output slot)``; ``kv_parts[i]``:
        the pieces (device tensors or lists of slots) whose concatenation is sequence ``i``'s
        K/V slot list, its new slot last. Returns float32 logits ``[len(rows), vocab]`` (a view,
        valid until the next step), or None when no bucket fits or its capture failed."""
        n = len(rows)
        lens = [sum(len(p) for p in parts) for parts in kv_parts]
        key = self.bucket(n, max(lens)) if n else None
        if key is None:
            return None
        b, cols = key
        replay = self.replay_fn(b, cols)  # captured before the buffers are filled
        if replay is None:
            return None
        host_lists = [p for parts in kv_parts for p in parts if isinstance(p, list)]
        pad = b - n
        flat_host = (
            [r[0] for r in rows] + [0] * pad
            + [r[1] for r in rows] + [0] * pad
            + [r[2] for r in rows] + [self.scratch_slot] * pad
            + lens + [0] * pad
        )  # fmt: skip
        for p in host_lists:
            flat_host += p
        host = torch.tensor(flat_host, dtype=torch.long, pin_memory=self.pin)
        packed = host.to(self.device, non_blocking=True) if self.pin else host  # the one H2D copy
        ints = self.ints(b)
        ints.copy_(packed[: 4 * b].view(4, b))
        pieces: list[torch.Tensor] = []
        off = 4 * b
        for parts in kv_parts:
            for p in parts:
                if isinstance(p, list):
                    pieces.append(packed[off : off + len(p)])
                    off += len(p)
                else:
                    pieces.append(p)
        total = sum(lens)
        torch.cat(pieces, out=self.kv_flat[:total])
        return replay()[:n]
