"""The engine thread's admission, deadlines, shutdown and counters, over a model-free stand-in
for the engine (each request needs a number of steps; ``step`` takes a little time)."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

from multiverse.server.engine_thread import EngineThread, Job
from multiverse.server.metrics import Metrics


class FakeLLM:
    """``add_request`` / ``step`` / ``abort`` / ``output``; records every admitted request."""

    def __init__(self, steps: int = 10_000, dt: float = 0.005) -> None:
        self.tokenizer = SimpleNamespace(encode=lambda s, add_special_tokens=False: [1] * len(s))
        self.steps, self.dt = steps, dt
        self.admitted: list[SimpleNamespace] = []

    def add_request(self, ids, params):
        req = SimpleNamespace(id=len(self.admitted), prompt_cached=True, num_generated=0, num_blocks=0,
                              finished=False, reason=None)  # fmt: skip
        self.admitted.append(req)
        return req

    def step(self):
        time.sleep(self.dt)
        done = []
        for r in self.admitted:
            if not r.finished:
                r.num_generated += 1
                if r.num_generated >= self.steps:
                    r.finished, r.reason = True, "length"
                    done.append(r)
        return done

    def abort(self, req) -> bool:
        req.finished, req.reason = True, "abort"
        return True

    def output(self, req, prompt=None):
        usage = SimpleNamespace(completion_tokens=req.num_generated, parallel_degree=1.0, seconds=0.1,
                                depth_tokens=req.num_generated)  # fmt: skip
        return SimpleNamespace(finish_reason=req.reason or "abort", usage=usage, text="")


def _job(inbox: queue.Queue, name: str, timeout: float | None = None) -> Job:
    return Job("ab", SimpleNamespace(stop=None), lambda msg: inbox.put((name, *msg)), timeout=timeout)


def _wait(cond, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_a_job_that_expired_in_the_queue_is_never_admitted():
    llm = FakeLLM(steps=60)  # the running job takes 60 steps (0.3 s or more)
    engine = EngineThread(llm, max_running=1)
    inbox: queue.Queue = queue.Queue()
    try:
        engine.submit([_job(inbox, "long")])
        _wait(lambda: len(llm.admitted) == 1)
        engine.submit([_job(inbox, "queued", timeout=0.05)])  # waits behind it and expires there
        got = {}
        while len(got) < 2:
            name, kind, _, payload, _ = inbox.get(timeout=30)
            got[name] = (kind, payload)
        assert got["queued"] == ("timeout", None)  # answered without an output: it never ran
        assert got["long"][0] == "done"
        assert len(llm.admitted) == 1  # never admitted, never prefilled
        assert engine.metrics.timeouts == 1 and engine.metrics.aborted == 1
    finally:
        engine.close()


def test_drain_answers_queued_and_running_jobs():
    llm = FakeLLM()  # never finishes on its own
    engine = EngineThread(llm, max_running=1)
    inbox: queue.Queue = queue.Queue()
    engine.submit([_job(inbox, "running")])
    _wait(lambda: len(llm.admitted) == 1)
    engine.submit([_job(inbox, "queued")])
    assert engine.drain(0.05) is False  # time is up: everything is aborted and answered
    got = {}
    while len(got) < 2:
        name, kind, _, payload, _ = inbox.get(timeout=10)
        got[name] = (kind, payload)
    assert got["queued"] == ("shutdown", None)
    assert got["running"][0] == "shutdown" and got["running"][1].finish_reason == "abort"
    assert engine.idle()
    engine.close()


def test_close_answers_what_is_left():
    llm = FakeLLM()
    engine = EngineThread(llm, max_running=1)
    inbox: queue.Queue = queue.Queue()
    engine.submit([_job(inbox, "running")])
    _wait(lambda: len(llm.admitted) == 1)
    engine.submit([_job(inbox, "queued")])
    engine.close()  # without a drain first
    kinds = sorted(inbox.get(timeout=10)[:2] for _ in range(2))
    assert kinds == [("queued", "shutdown"), ("running", "shutdown")]


class LockChecked(Metrics):
    """Metrics that note every write of a counter made without the engine's lock held."""

    COUNTERS = ("aborted", "timeouts", "rejected", "errors")

    def __init__(self, cond: threading.Condition) -> None:
        super().__init__()
        object.__setattr__(self, "_cond", cond)
        object.__setattr__(self, "unlocked", [])

    def __setattr__(self, name, value):
        cond = getattr(self, "_cond", None)
        if cond is not None and name in self.COUNTERS and not cond._is_owned():
            self.unlocked.append((name, threading.current_thread().name))
        super().__setattr__(name, value)


def test_counters_are_written_under_the_lock():
    llm = FakeLLM()
    engine = EngineThread(llm, max_running=2, max_waiting=4)
    engine.metrics = LockChecked(engine.cond)
    inbox: queue.Queue = queue.Queue()
    try:
        a, b, c = _job(inbox, "a"), _job(inbox, "b", timeout=0.05), _job(inbox, "c")
        engine.submit([a])
        _wait(lambda: len(llm.admitted) == 1)
        engine.submit([b])  # runs and times out on the engine thread
        engine.cancel([a])  # a running job: aborted on the engine thread
        engine.submit([c])
        engine.cancel([c])  # maybe still queued: counted on this thread
        _wait(lambda: engine.idle())
        assert engine.metrics.aborted == 3 and engine.metrics.timeouts == 1
        assert engine.metrics.unlocked == []
    finally:
        engine.close()
