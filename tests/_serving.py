"""Serving an ASGI app for the tests: uvicorn on 127.0.0.1, a free port, in a thread (shared by
``tests/server`` and ``tests/remote``)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(app):
    """Yield the base URL of uvicorn serving ``app`` in a thread; stopped on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def sse_chunks(url: str, path: str, body: dict, headers: dict, timeout: float = 300) -> list[dict]:
    """POST ``body`` with ``stream: true`` to ``url + path``; the SSE chunks as dicts (the
    stream must answer 200 and end with ``[DONE]``)."""
    import httpx

    with httpx.stream(
        "POST", f"{url}{path}", json={**body, "stream": True}, headers=headers, timeout=timeout
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def agenerate_and_close(driver, prompts, params, **kwargs) -> list:
    """``driver.agenerate(prompts, params, **kwargs)`` (``stream=True``, ``on_progress=...``) run
    to the end in a fresh event loop, the driver's HTTP client closed after it."""

    async def run():
        try:
            return await driver.agenerate(prompts, params, **kwargs)
        finally:
            await driver.aclose()

    return asyncio.run(run())
