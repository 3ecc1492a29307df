"""The one thread that owns the :class:`~multiverse.engine.llm.LLM` (the engine is not thread safe).

HTTP handlers (asyncio) make :class:`Job` s and :meth:`EngineThread.submit` them; the thread
admits waiting jobs into the running batch between steps (continuous batching across clients,
at most ``max_running`` at once; at most ``max_waiting`` wait, beyond that :class:`QueueFull`;
a job with ``after`` set waits until that job's prompt is computed, so the ``n`` completions of
one request share the prompt's KV through the prefix cache),
steps the engine, and reports to each job's ``sink`` (a thread-safe callable, usually
``loop.call_soon_threadsafe`` onto an ``asyncio.Queue``):

  * ``("chunk", index, None, (text, events, ids))``: streaming jobs, after each step with
    something new (``text`` extends the canonical text sent so far, ``ids`` its token ids, which
    a stop string does not hold back; ``events``: :mod:`.streaming`);
  * ``("done", index, output, (text, events, ids))``: the request finished (``output``: its
    :class:`~multiverse.engine.llm.RequestOutput`; for a streaming job the rest of its text and
    of its ``token_ids``, the stop token that ended it last);
  * ``("timeout", index, output, None)``: its ``deadline`` passed; it was aborted (``output``
    ``None``: it expired in the queue, never admitted);
  * ``("shutdown", index, output, None)``: the server is shutting down and the job was aborted
    (or never admitted: ``output`` ``None``);
  * ``("error", index, exception, None)``: the prompt was refused or the engine failed (an
    unexpected failure is logged with its traceback here).

A job's prompt is text, token ids, or a callable ``tokenizer -> ids`` (a chat: rendered and
tokenised here, on the thread that owns the tokenizer). Counters of :attr:`metrics` are written
under :attr:`cond` (the HTTP side counts cancels and 429s too).

The engine state is only read here (``llm.requests``, the requests' branch trees, ``llm.kv``)
and changed only through the engine's API: ``add_request``, ``step``, ``abort``.
:meth:`EngineThread.cancel` (a client went away) aborts between two steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multiverse.server import responses
from multiverse.server.metrics import Metrics
from multiverse.server.streaming import BranchStreamer

log = logging.getLogger("multiverse.server")


class QueueFull(RuntimeError):
    """The admission queue is full: answer 429 with ``Retry-After``."""


class EngineStopped(RuntimeError):
    """The server is shutting down or the engine thread died: answer 503."""


@dataclass(eq=False)
class Job:
    """One completion: a prompt, its settings, and where its results go."""

    prompt: str | list[int] | Callable[[Any], list[int]]
    params: Any  # SamplingParams
    sink: Callable[[tuple[Any, ...]], None]
    index: int = 0
    stream: bool = False
    token_ids: bool = False  # a streaming job's chunks carry their token ids (return_token_ids)
    timeout: float | None = None  # seconds from admission into the queue
    deadline: float = field(default=float("inf"), init=False)
    req: Any = field(default=None, init=False)
    streamer: BranchStreamer | None = field(default=None, init=False)
    finished: bool = field(default=False, init=False)
    timed_out: bool = field(default=False, init=False)  # cancelled by its handler at the deadline
    seen_tokens: int = field(default=0, init=False)
    seen_blocks: int = field(default=0, init=False)
    after: Job | None = None  # admitted once that job's prompt is computed (``n`` > 1: the prefix cache)


def _ready(job: Job) -> bool:
    first = job.after
    return first is None or first.finished or (first.req is not None and bool(first.req.prompt_cached))


class EngineThread:
    """Owns the engine; see the module docstring for the protocol."""

    def __init__(self, llm: Any, max_running: int = 64, max_waiting: int = 256) -> None:
        self.llm = llm
        self.max_running, self.max_waiting = max(1, max_running), max(0, max_waiting)
        self.metrics = Metrics()
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.cancels: list[Job] = []
        self.running: dict[int, Job] = {}  # request id -> job; touched by the engine thread only
        self.intake = True
        self.shutting_down = False  # set by :meth:`drain` when its time is up: answer and abort everything
        self.stopped = False
        self.error: BaseException | None = None
        self.snapshot: dict[str, float] = {}
        self._take_snapshot()
        self.thread = threading.Thread(target=self._loop, name="multiverse-engine", daemon=True)
        self.thread.start()

    # -- called from the HTTP side ---------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.error is None and self.thread.is_alive()

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none): raises :class:`QueueFull` or :class:`EngineStopped`."""
        with self.cond:
            if not self.intake or not self.alive:
                raise EngineStopped(f"the engine is not accepting requests ({self.error or 'shutting down'})")
            if len(self.running) + len(self.waiting) + len(jobs) > self.max_running + self.max_waiting:
                self.metrics.rejected += len(jobs)
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_waiting})")
            now = time.monotonic()
            for job in jobs:
                if job.timeout is not None:
                    job.deadline = now + job.timeout
                self.waiting.append(job)
            self.cond.notify()

    def cancel(self, jobs: list[Job], timed_out: bool = False) -> None:
        """The client is gone (or, ``timed_out``, its handler's deadline passed): drop waiting
        jobs now, abort running ones between two steps."""
        with self.cond:
            for job in jobs:
                if job.finished:
                    continue
                job.timed_out = job.timed_out or timed_out
                if job in self.waiting:
                    self.waiting.remove(job)
                    job.finished = True
                    self.metrics.aborted += 1
                    self.metrics.timeouts += int(timed_out)
                else:
                    self.cancels.append(job)
            self.cond.notify()

    def stop_intake(self) -> None:
        with self.cond:
            self.intake = False

    def idle(self) -> bool:
        with self.cond:
            return not self.waiting and not self.running and not self.cancels

    def drain(self, timeout: float) -> bool:
        """Stop intake, let in-flight work finish for up to ``timeout`` s, then abort the rest:
        every job still queued or running is answered ``("shutdown", ...)``. Returns True when
        everything finished on its own."""
        self.stop_intake()
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.alive and not self.idle():
            time.sleep(0.02)
        clean = self.idle()
        if not clean:
            with self.cond:
                self.shutting_down = True
                self.cond.notify()
            end = time.monotonic() + 5
            while time.monotonic() < end and self.alive and not self.idle():
                time.sleep(0.02)
        return clean

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join(timeout=10)
        with self.cond:  # the thread has ended (or hangs in a step): nobody is left waiting
            jobs = [j for j in [*self.waiting, *self.running.values(), *self.cancels] if not j.finished]
            self.waiting.clear(), self.running.clear(), self.cancels.clear()
        for job in jobs:
            job.finished = True
            try:
                job.sink(("shutdown", job.index, None, None))
            except RuntimeError:  # its handler's event loop is already closed: nobody to answer
                log.debug("job %d: no handler left to answer at close", job.index)

    # -- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the thread must not die silently with clients waiting
            log.exception("the engine thread failed")
            self.error = e
            with self.cond:
                jobs = list(self.running.values()) + list(self.waiting) + self.cancels
                self.running.clear(), self.waiting.clear(), self.cancels.clear()
            for job in jobs:
                self._fail(job, RuntimeError(f"engine thread failed: {e!r}"))
            raise

    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and not self.running and not self.waiting and not self.cancels:
                    self.cond.wait(0.5)
                if self.stopped:
                    return
                cancels, self.cancels = self.cancels, []
                now = time.monotonic()
                gone = [j for j in self.waiting if self.shutting_down or j.deadline <= now]
                for job in gone:  # expired in the queue (or shutting down): answered, never prefilled
                    self.waiting.remove(job)
                    job.finished = True
                    self.metrics.aborted += 1
                    self.metrics.timeouts += int(not self.shutting_down)
                new = []
                for job in list(self.waiting):
                    if len(self.running) + len(new) >= self.max_running:
                        break
                    if _ready(job):
                        self.waiting.remove(job)
                        new.append(job)
                if self.shutting_down:
                    cancels += [j for j in self.running.values() if j not in cancels]
            for job in gone:
                job.sink(("shutdown" if self.shutting_down else "timeout", job.index, None, None))
            for job in cancels:
                self._abort(job, "shutdown" if self.shutting_down else "timeout" if job.timed_out else "abort")
            for job in new:
                self._admit(job)
            now = time.monotonic()
            for job in [j for j in self.running.values() if j.deadline < now]:
                self._abort(job, "timeout")
            if self.running:
                self._step()
            self._take_snapshot()

    def _admit(self, job: Job) -> None:
        try:
            ids = job.prompt
            if callable(ids):  # a chat, tokenised here: the tokenizer is the engine thread's too
                ids = ids(self.llm.tokenizer)
            elif isinstance(ids, str):
                ids = self.llm.tokenizer.encode(ids, add_special_tokens=False)
            kv = getattr(self.llm, "kv", None)
            if kv is not None and len(ids) >= kv.num_slots:
                raise ValueError(f"the prompt is {len(ids)} tokens; the KV pool holds {kv.num_slots}")
            req = self.llm.add_request(ids, job.params)
        except Exception as e:  # a bad prompt: answer this client, keep serving
            if isinstance(e, ValueError):  # refused (400): the traceback only at debug
                log.debug("prompt of job %d refused: %s", job.index, e, exc_info=True)
            else:
                log.exception("admitting a request failed")
            self._fail(job, e)
            return
        job.req = req
        if job.stream:
            # stop strings: read from the request
            job.streamer = BranchStreamer(self.llm.tokenizer, token_ids=job.token_ids)
        with self.cond:
            self.running[req.id] = job

    def _step(self) -> None:
        try:
            done = self.llm.step()
        except Exception as e:  # an engine failure must not hang the clients
            log.exception("engine step failed; failing %d running request(s)", len(self.running))
            with self.cond:
                jobs = list(self.running.values())
                self.running.clear()
            for job in jobs:
                self._try_abort(job)
                self._fail(job, e)
            return
        for job in list(self.running.values()):
            self._count(job)
        for req in done:
            job = self.running.get(req.id)
            if job is not None and job.req is req:
                self._complete(job, "done")
        for job in list(self.running.values()):
            if job.streamer is None:
                continue
            try:
                text, events = job.streamer.update(job.req)
            except Exception as e:  # noqa: BLE001 - a streaming bug ends this stream, not the server
                log.exception("streaming request %s failed", job.req.id)
                self._abort(job, "abort", notify=False)
                self._fail(job, RuntimeError(f"streaming failed: {e!r}"))
                continue
            ids = job.streamer.ids
            if text or events or ids:
                job.sink(("chunk", job.index, None, (text, events, ids)))

    def _count(self, job: Job) -> None:
        req, m = job.req, self.metrics
        n, b = int(getattr(req, "num_generated", 0)), int(getattr(req, "num_blocks", 0))
        m.tokens += n - job.seen_tokens
        m.forks += b - job.seen_blocks
        job.seen_tokens, job.seen_blocks = n, b

    def _complete(self, job: Job, kind: str) -> None:
        """``job``'s request has finished (or was aborted): send its output."""
        with self.cond:
            self.running.pop(job.req.id, None)
        job.finished = True
        try:
            out = self.llm.output(job.req, job.prompt if isinstance(job.prompt, str) else None)
        except Exception as e:  # never leave a client waiting
            log.exception("building the output of request %s failed", job.req.id)
            job.sink(("error", job.index, e, None))
            return
        self.metrics.observe(out)
        rest = None
        if job.streamer is not None:
            final_ids = responses.token_ids(out)["token_ids"]  # the stop token that ended it last
            text, events = job.streamer.finish(job.req, out.text, final_ids)
            rest = (text, events, job.streamer.ids)
        job.sink((kind, job.index, out, rest))

    def _try_abort(self, job: Job) -> bool:
        abort = getattr(self.llm, "abort", None)
        if abort is None or job.req is None:
            return False
        try:
            return bool(abort(job.req))
        except Exception:  # noqa: BLE001 - a failed abort must not stop the server
            return False

    def _abort(self, job: Job, kind: str, notify: bool = True) -> None:
        if job.finished or job.req is None or self.running.get(job.req.id) is not job:
            return
        self._count(job)
        self._try_abort(job)
        with self.cond:  # cancel() counts on the HTTP side
            self.metrics.aborted += 1
            self.metrics.timeouts += int(kind == "timeout")
        if notify:
            self._complete(job, kind)
        else:
            with self.cond:
                self.running.pop(job.req.id, None)

    def _fail(self, job: Job, e: BaseException) -> None:
        job.finished = True
        with self.cond:
            self.metrics.errors += 1
        job.sink(("error", job.index, e, None))

    def _take_snapshot(self) -> None:
        kv = getattr(self.llm, "kv", None)
        radix = getattr(self.llm, "radix", None)
        snap = {"running": float(len(self.running)), "waiting": float(len(self.waiting))}
        if kv is not None:
            snap.update(kv_total=float(kv.num_slots), kv_used=float(kv.num_used), kv_free=float(kv.num_free))
            snap["kv_cached"] = float(radix.num_cached_tokens()) if radix is not None else 0.0
        if radix is not None:
            snap.update(cache_queried=float(radix.queried_tokens), cache_hits=float(radix.hit_tokens))
        self.snapshot = snap
