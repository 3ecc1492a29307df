"""``multiverse serve`` as a process: the options, SIGTERM's graceful shutdown (in-flight
streams finish, then the process exits), the exposure warning, the prompt format it announces."""

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

from multiverse.server.runner import exposure_warning, is_loopback


def test_exposure_warning():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)


def test_sigterm_finishes_in_flight_streams_then_exits():
    port = free_port()
    env = {**os.environ, "MULTIVERSE_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "multiverse.cli", "serve", "--port", str(port), "--threads", "1",
                             "--shutdown-timeout", "20", "--kv-slots", "8192"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401  # the key from the environment
        lines: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"prompt": "a", "max_tokens": 80, "ignore_eos": True, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": "Bearer k"}) as r:  # fmt: skip
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        said = proc.stdout.read()
        assert "prompt format: chat template + SPEC 1.3 parallel suffix (" in said, said  # the shipped model's
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"  # it ran to its end, not aborted
