"""``multiverse serve`` as a process, SIGTERM while requests still run when ``--shutdown-timeout``
ends: every client is answered (non-streaming: 503 ``shutdown``; a stream: an error event and
``[DONE]``; a request still queued: 503 too) before uvicorn would cancel a handler, and the log
holds no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from conftest import free_port

from multiverse.server.metrics import parse

KEY = {"Authorization": "Bearer k"}
LONG = {"prompt": "a", "max_tokens": 8000, "ignore_eos": True, "temperature": 0}


def _start(port: int) -> subprocess.Popen:
    env = {**os.environ, "MULTIVERSE_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "multiverse.cli", "serve", "--port", str(port), "--threads", "1",
                             "--shutdown-timeout", "1", "--kv-slots", "16384", "--max-concurrent-requests", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_for(url: str, proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if ready(url):
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not get there"
        time.sleep(0.05)


def test_sigterm_answers_every_request_still_running_or_queued():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(port)
    answers: dict[str, httpx.Response] = {}
    lines: list[str] = []
    try:
        _wait_for(url, proc, lambda u: httpx.get(u + "/health", timeout=1).status_code == 200)

        def post(name: str) -> None:
            answers[name] = httpx.post(url + "/v1/completions", json=LONG, headers=KEY, timeout=120)

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, headers=KEY,
                              timeout=120) as r:  # fmt: skip
                lines.extend(line for line in r.iter_lines() if line)

        threads = [threading.Thread(target=post, args=("running",)), threading.Thread(target=stream)]
        for t in threads:
            t.start()

        def counts(u: str) -> tuple[float, float]:
            m = parse(httpx.get(u + "/metrics", headers=KEY, timeout=5).text)
            return m["multiverse_requests_running"], m["multiverse_requests_waiting"]

        _wait_for(url, proc, lambda u: counts(u) == (2, 0))
        queued = threading.Thread(target=post, args=("queued",))
        queued.start()
        threads.append(queued)
        _wait_for(url, proc, lambda u: counts(u) == (2, 1))
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for name in ("running", "queued"):
        r = answers[name]
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutdown", (name, r.text[:300])
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert json.loads(lines[-2][6:])["error"]["code"] == "shutdown"
    assert "Traceback" not in log and "Cancel" not in log, log[-3000:]
