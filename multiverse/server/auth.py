"""The ASGI guard in front of the app: API key and request body size.

* With an API key, every path but the open ones (``/health``) needs the header
  ``Authorization: Bearer <key>`` (compared in constant time); otherwise 401.
* A body larger than ``max_body_bytes`` is refused with 413: at once when ``Content-Length``
  says so, else as soon as the received chunks pass the limit (the app's reply is replaced).

Both answers are OpenAI-shaped error objects (:func:`multiverse.server.errors.error_body`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from multiverse.server.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})


async def _reply(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: ``Guard(app, api_key=None, max_body_bytes=...)``."""

    def __init__(self, app: Any, api_key: str | None = None, max_body_bytes: int = 1 << 20,
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:  # fmt: skip
        self.app = app
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    def authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope.get("path") in self.open_paths:
            return True
        headers = dict(scope.get("headers") or [])
        got = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.authorized(scope):
            body = error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                              "authentication_error", code="invalid_api_key")  # fmt: skip
            await _reply(send, 401, body, [(b"www-authenticate", b"Bearer")])
            return
        limit = self.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_body(f"request body larger than {limit} bytes", "invalid_request_error",
                               code="request_too_large")  # fmt: skip
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > limit:
            await _reply(send, 413, too_large)
            return
        seen = 0
        over = False
        replaced = False

        async def counted_receive() -> Message:
            nonlocal seen, over
            msg = await receive()
            if msg.get("type") == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal replaced
            if over:
                if not replaced and msg["type"] == "http.response.start":
                    replaced = True
                    await _reply(send, 413, too_large)
                return
            await send(msg)

        await self.app(scope, counted_receive, guarded_send)
