"""OpenAI-shaped error objects: ``{"error": {"message", "type", "param", "code"}}``.

:class:`APIError` is what the handlers raise; :func:`install` registers the handlers that turn
it, FastAPI's validation errors (400, with ``param`` naming the field), HTTP errors (invalid
JSON / UTF-8 bodies, 404, 405) and anything unexpected (500, logged) into such objects.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("multiverse.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}  # fmt: skip


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error answer: status, message, and optionally the offending field and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, _TYPES.get(self.status, "server_error"), self.param, self.code)


_TYPE_NAMES = ("str", "int", "float", "bool", "list[", "dict[", "function-", "constrained-", "union[", "literal[")


def _loc(loc: tuple[Any, ...] | list[Any]) -> tuple[str | None, str]:
    """(the top-level field, the path to the problem without pydantic's union member names)."""
    parts = [str(p) for p in loc if p != "body" and not str(p).startswith(_TYPE_NAMES)]
    return (parts[0] if parts else None), ".".join(parts)


def install(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def _api(request: Any, exc: APIError) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Any, exc: RequestValidationError) -> Any:
        errs = exc.errors()
        # a validator's own message (a union tries each member: its type errors come first) else the first
        first = next((e for e in errs if e.get("type") == "value_error"), errs[0] if errs else {})
        param, where = _loc(first.get("loc", ()))
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            msg, param, where = "the body is not valid JSON", None, ""
        text = f"{where}: {msg}" if where else msg
        if len(errs) > 1:
            text += f" (and {len(errs) - 1} more problems)"
        return JSONResponse(error_body(text, "invalid_request_error", param, str(first.get("type") or "")),
                            status_code=400)  # fmt: skip

    @app.exception_handler(HTTPException)
    async def _http(request: Any, exc: HTTPException) -> Any:
        status = exc.status_code
        return JSONResponse(error_body(str(exc.detail), _TYPES.get(status, "invalid_request_error")),
                            status_code=status, headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Any, exc: Exception) -> Any:
        log.exception("unexpected error in %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {exc!r}", "server_error"), status_code=500)
