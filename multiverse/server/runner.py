"""Run the app under uvicorn with a graceful shutdown.

SIGTERM / SIGINT: uvicorn stops listening and waits up to ``shutdown_timeout`` seconds for the
open requests to finish; at the app's shutdown the engine stops taking requests (503) and
whatever is still running is aborted (:meth:`EngineThread.drain`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

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


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
          log_level: str = "info") -> None:  # fmt: skip
    """``uvicorn.run`` with ``timeout_graceful_shutdown``: on SIGTERM uvicorn stops listening,
    closes idle keep-alive connections (no new request can arrive), waits for the open ones;
    then the app's shutdown aborts whatever still runs."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=max(1, int(shutdown_timeout)))  # fmt: skip
