"""Run the app under uvicorn with a graceful shutdown.

SIGTERM / SIGINT: uvicorn stops listening and the engine stops taking requests (503); the open
requests get up to ``shutdown_timeout`` seconds to finish, then the engine aborts what still
runs or waits and every handler answers it (503 ``shutdown``; a stream: an error event and
``[DONE]``), all before uvicorn's own deadline (a few seconds later), so no handler is
cancelled mid-answer (:meth:`EngineThread.drain`).

:func:`check_bind` tries the address before anything loads (a bad ``--port``, a port in use).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
from typing import Any

GRACE_S = 10  # uvicorn's deadline beyond ``shutdown_timeout``: time for the handlers to answer

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a public bind without an API key (None when there is nothing to say)."""
    if is_loopback(host) or api_key:
        return None
    return (f"binding {host} (not loopback) without an API key: anyone who can reach this address can "
            "use the model (set --api-key or MULTIVERSE_API_KEY)")  # fmt: skip


def check_bind(host: str, port: int) -> None:
    """Raise ``ValueError`` naming ``--host`` / ``--port`` and the reason when the server could
    not listen there (not a TCP port, an unknown host, the port in use or not allowed)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: not a TCP port (0-65535)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: cannot be resolved ({getattr(e, 'strerror', None) or e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def graceful_server(app: Any, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
                    log_level: str = "info") -> Any:  # fmt: skip
    """A ``uvicorn.Server`` over ``app`` whose shutdown answers every request before uvicorn
    would cancel a handler: on SIGTERM it stops listening, closes idle keep-alive connections,
    and the engine (``app.state.engine``) drains: its requests get ``shutdown_timeout`` s to
    finish, the rest are aborted and answered; uvicorn waits ``GRACE_S`` s longer."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            engine = getattr(app.state, "engine", None)
            drain = asyncio.create_task(asyncio.to_thread(engine.drain, shutdown_timeout)) if engine else None
            try:
                await super().shutdown(sockets)
            finally:
                if drain is not None:
                    await drain

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=math.ceil(shutdown_timeout) + GRACE_S)  # fmt: skip
    return Server(config)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
          log_level: str = "info") -> None:  # fmt: skip
    """Run :func:`graceful_server` until SIGTERM / SIGINT."""
    graceful_server(app, host, port, shutdown_timeout, log_level).run()
