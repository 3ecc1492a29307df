"""An async OpenAI-compatible chat client (``POST {base_url}/chat/completions``) over httpx.

Works against OpenAI, vLLM, SGLang and ``multiverse serve``. Retries on HTTP 408, 409, 429
and 5xx, on timeouts and on connection errors, with exponential backoff (``backoff * 2**k``,
capped at ``max_backoff``) times a random jitter in [0.5, 1.5), or the server's
``Retry-After`` (seconds or an HTTP date) when it sends one. Any other status, or a retry
budget spent, raises :class:`ClientError` (HTTP 401, 403, 404 and 405 as ``refused``: the
endpoint's configuration, not the record, is wrong). Counters (requests, retries, tokens) are kept on
the client for the run summary. ``httpx`` is imported when a client is made.

Connections: one keep-alive connection per request in flight, each in its own single-connection
``httpx.AsyncClient`` taken from an idle list and put back after the request (a new one is made
when none is idle). One shared pool of N connections would cost O(N) per request in httpcore's
pool bookkeeping (it scans every connection, polling its socket, on each assignment), which at
``--concurrency 16`` took a third of the client's CPU time. The clients share one SSL context
(made once: loading the CA bundle costs ~0.1 s of CPU, which would block the event loop).

Credentials: a ``user:password@`` in ``base_url`` is sent as HTTP basic auth and kept out of the
URL the client uses, so no error message, log line (httpx logs each request's URL at INFO) or
file of the run (``run.json``, ``rejected.jsonl``) can hold it; :class:`ClientError` messages
are passed through :func:`redact_urls` as well (a reply's text may quote a URL).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

RETRY_STATUS = frozenset({408, 409, 429})
# the endpoint, not the record, is wrong: no or a bad API key, a wrong --base-url or --model
REFUSED_STATUS = frozenset({401, 403, 404, 405})


class ClientError(RuntimeError):
    """A request that failed: ``permanent`` for a non-retryable status (the record is
    rejected), else out of retries (the record stays pending for the next run); ``refused``
    for a status saying the endpoint's configuration is wrong (:data:`REFUSED_STATUS`): the run
    stops and every record stays pending, since no record would fare better."""

    def __init__(self, message: str, permanent: bool = False, refused: bool = False):
        super().__init__(redact_urls(message))
        self.permanent = permanent
        self.refused = refused


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


@dataclass(slots=True)
class ClientStats:
    requests: int = 0  # HTTP attempts sent
    completions: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)


_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def redact_urls(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``."""
    return _USERINFO.sub(r"\1***@", text)


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its ``user:password@`` part, and that part (percent-decoded) or None."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ChatClient:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 120.0,
                 max_retries: int = 6, backoff: float = 0.5, max_backoff: float = 30.0,
                 temperature: float = 0.0, max_tokens: int = 4096, seed: int | None = None):  # fmt: skip
        import httpx

        self.url, self._auth = split_credentials(base_url.rstrip("/") + "/chat/completions")
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sampling: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._idle: list[Any] = []  # single-connection httpx clients not in use
        self._all: list[Any] = []
        self._httpx = httpx
        self._ssl = httpx.create_ssl_context()  # once: loading the CA bundle takes ~0.1 s of CPU

    def _take(self) -> Any:
        if self._idle:
            return self._idle.pop()
        http = self._httpx.AsyncClient(timeout=self._timeout, headers=self._headers, verify=self._ssl,
                                       auth=self._auth,  # basic auth from the URL's user:password@
                                       limits=self._httpx.Limits(max_connections=1, max_keepalive_connections=1))  # fmt: skip
        self._all.append(http)
        return http

    async def _post(self, body: dict[str, Any]) -> Any:
        http = self._take()
        try:
            return await http.post(self.url, json=body)
        finally:
            self._idle.append(http)

    def _delay(self, attempt: int, header: str | None) -> float:
        told = retry_after(header)
        if told is not None:
            return min(told, self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff) * (0.5 + self._rng.random())

    def _note_retry(self, reason: str) -> None:
        self.stats.retries += 1
        self.stats.retry_reasons[reason] = self.stats.retry_reasons.get(reason, 0) + 1

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        body = {"model": self.model, "messages": messages, **self.sampling}
        last = ""
        for attempt in range(self.max_retries + 1):
            header = None
            self.stats.requests += 1
            try:
                resp = await self._post(body)
            except self._httpx.TimeoutException:
                last = "timeout"
            except self._httpx.TransportError as e:
                last = f"connection error ({type(e).__name__})"
            else:
                if resp.status_code == 200:
                    return self._completion(resp, attempt)
                last = f"HTTP {resp.status_code}"
                if resp.status_code in REFUSED_STATUS:
                    raise ClientError(f"{last} from {self.url}: {resp.text[:200]}", refused=True)
                if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
                    raise ClientError(f"{last} from {self.url}: {resp.text[:200]}", permanent=True)
                header = resp.headers.get("Retry-After")
            if attempt == self.max_retries:
                break
            self._note_retry(last.split(" (")[0])
            await asyncio.sleep(self._delay(attempt, header))
        raise ClientError(f"{last} from {self.url} after {self.max_retries} retries")

    def _completion(self, resp: Any, attempt: int) -> Completion:
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ClientError(f"not an OpenAI chat completion from {self.url}: {e}") from e
        usage = data.get("usage") or {}
        out = Completion(text, choice.get("finish_reason") or "", int(usage.get("prompt_tokens") or 0),
                         int(usage.get("completion_tokens") or 0), attempt)  # fmt: skip
        self.stats.completions += 1
        self.stats.prompt_tokens += out.prompt_tokens
        self.stats.completion_tokens += out.completion_tokens
        return out

    async def aclose(self) -> None:
        for http in self._all:
            await http.aclose()
        self._idle.clear()
        self._all.clear()
