"""HTTP to one OpenAI-compatible server: ``/v1/completions`` in token ids, ``/v1/models``,
``/metrics``. Async (httpx), one connection pool per replica, a concurrency limit shared by every
request of a driver, retries of 429 / 5xx / timeouts / dropped connections with exponential
backoff (tenacity).

Contract of :meth:`Replica.complete`: it returns the completion's *token ids* (the server's
``text`` is never read), their logprobs when asked, the finish reason and the stop reason. A
task running it that is cancelled closes its connection (httpx drops a connection whose response
was not read), so the server sees the disconnect and frees the work. Errors that retrying does
not cure raise :class:`RemoteError` naming the URL, the status and the server's message.
:meth:`Replica.stream` is the same completion streamed (``stream: true``): the token ids as they
come, retried until the first ones arrive; a break after that raises :class:`StreamCut`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

log = logging.getLogger("multiverse.remote")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RemoteError(RuntimeError):
    """A sub-request failed for good (after the retries, or a status retrying does not cure)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StreamCut(RemoteError):
    """A streamed completion broke after ``received`` tokens had arrived (the connection dropped,
    an error event, the stream ended with no finish reason): not retried here, since what came
    is kept; the driver continues from it (:mod:`multiverse.remote.driver`)."""

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message, None)
        self.received = received


@dataclass(slots=True)
class Completion:
    """What one completions call gave: the generated ids (a stop token the server matched kept
    last, as vLLM keeps it), their logprobs (``None`` when not asked), the reasons, and the
    Multiverse vLLM plugin's report (``kv_transfer_params.multiverse``: loaded, saved, error)."""

    token_ids: list[int]
    logprobs: list[float | None] | None
    finish_reason: str | None
    stop_reason: int | str | None
    connector: dict[str, Any] | None = None


def retryable(e: BaseException) -> bool:
    if isinstance(e, RemoteError):
        return e.status in RETRY_STATUS
    return isinstance(e, (httpx.TimeoutException, httpx.TransportError))


def parse_completion(body: dict[str, Any], url: str) -> Completion:
    """The first choice of a completions response, in token ids (vLLM's ``return_token_ids``
    fields; ``multiverse serve`` gives the same)."""
    try:
        choice = body["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise RemoteError(
            f"{url}: a completions response without choices: {str(body)[:200]}"
        ) from None
    ids = choice.get("token_ids")
    if not isinstance(ids, list) or any(not isinstance(t, int) for t in ids):
        raise RemoteError(f"{url}: the response has no `token_ids` (the driver works in token ids: the server "
                          "must support `return_token_ids`, as vLLM >= 0.10 and `multiverse serve` do)")  # fmt: skip
    lps = None
    lp_obj = choice.get("logprobs")
    if isinstance(lp_obj, dict) and lp_obj.get("token_logprobs") is not None:
        lps = [None if v is None else float(v) for v in lp_obj["token_logprobs"]]
        if len(lps) < len(ids):  # a server that leaves the stop token's logprob out
            lps += [None] * (len(ids) - len(lps))
        lps = lps[: len(ids)]
    kv = body.get("kv_transfer_params")
    report = kv.get("multiverse") if isinstance(kv, dict) else None
    return Completion(list(ids), lps, choice.get("finish_reason"), choice.get("stop_reason"),
                      report if isinstance(report, dict) else None)  # fmt: skip


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfa]+)\s*$")
PREFIX_CACHE_METRICS = (  # (hits, queries) counter pairs, in tokens
    ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
    ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total"),
    ("multiverse_prefix_cache_hit_tokens_total", "multiverse_prefix_cache_query_tokens_total"),
)


def metric_values(text: str) -> dict[str, float]:
    """Every sample of a Prometheus ``/metrics`` text, by name (labelled samples summed)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line.strip())
        if m:
            try:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return values


def prefix_cache_counters(text: str) -> tuple[float, float] | None:
    """``(hit tokens, queried tokens)`` from a Prometheus ``/metrics`` text (vLLM's counters or
    ours; labelled samples summed), or ``None`` when it has neither."""
    values = metric_values(text)
    for hits, queries in PREFIX_CACHE_METRICS:
        if hits in values and queries in values:
            return values[hits], values[queries]
    return None


class Replica:
    """One server (``base_url`` without the ``/v1``). Use inside ``async with`` (the pool)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0, retries: int = 4,
                 limit: asyncio.Semaphore | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:  # fmt: skip
        self.base_url = normalize_base_url(base_url)
        self.api_key, self.timeout, self.retries = api_key, timeout, retries
        self.limit = limit
        self.transport = transport
        self.client: httpx.AsyncClient | None = None
        self.num_requests = 0  # completions calls sent (retries included)
        self.in_flight = 0  # driver requests assigned to this replica now
        self.plain = False  # answered a whole completion with no Multiverse-plugin report (driver)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def __aenter__(self) -> Replica:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=self.headers(), limits=limits,
                                        timeout=httpx.Timeout(self.timeout, connect=min(30.0, self.timeout)),
                                        transport=self.transport)  # fmt: skip
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None, "use the replica inside `async with`"
        self.num_requests += 1
        url = f"{self.base_url}/v1/completions"
        resp = await self.client.post("/v1/completions", json=body)
        if resp.status_code != 200:
            raise RemoteError(f"{url}: HTTP {resp.status_code}: {_message(resp)}", resp.status_code)
        try:
            return resp.json()
        except ValueError:
            raise RemoteError(f"{url}: the response is not JSON: {resp.text[:200]!r}") from None

    def _retrying(self) -> AsyncRetrying:
        """The retry policy of every completions call (module docstring): 429 / 5xx / timeouts /
        dropped connections, up to ``retries`` more attempts, randomized exponential backoff."""
        return AsyncRetrying(retry=retry_if_exception(retryable), stop=stop_after_attempt(self.retries + 1),
                             wait=wait_random_exponential(multiplier=0.2, max=8.0), reraise=True,
                             before_sleep=_log_retry)  # fmt: skip

    async def complete(self, body: dict[str, Any], counts: list[int] | None = None) -> Completion:
        """One completion (``body``: the JSON request), retried as the module docstring says;
        ``counts[0]`` counts the calls sent (retries included)."""
        retrying = self._retrying()
        async for attempt in retrying:
            with attempt:
                if counts is not None:
                    counts[0] += 1
                if self.limit is not None:
                    async with self.limit:
                        data = await self._post(body)
                else:
                    data = await self._post(body)
        return parse_completion(data, f"{self.base_url}/v1/completions")

    async def stream(
        self, body: dict[str, Any], counts: list[int] | None = None
    ) -> AsyncIterator[Completion]:
        """One completion streamed (``stream: true``, Server-Sent Events): yields each chunk's
        *new* token ids as a :class:`Completion` (their logprobs, and on the last one the finish
        and stop reasons), as :meth:`complete` gives them whole (``text`` never read). Opening it
        and waiting for its first tokens are retried as :meth:`complete` is; a failure after
        tokens arrived raises :class:`StreamCut`. Closing the generator (``aclose``, or the
        cancelled task that iterates it) closes the connection: the server frees the work."""
        url = f"{self.base_url}/v1/completions"
        retrying = self._retrying()
        async with contextlib.AsyncExitStack() as held:
            async for attempt in retrying:
                with attempt:
                    if counts is not None:
                        counts[0] += 1
                    stack = contextlib.AsyncExitStack()
                    try:
                        chunks = await self._open(stack, {**body, "stream": True}, url)
                        first = await anext(chunks, None)
                    except BaseException:
                        await stack.aclose()
                        raise
            held.push_async_callback(stack.aclose)  # the connection (and the limit) until the end
            if first is None:
                return
            received = len(first.token_ids)
            if first.finish_reason is not None:
                await _drain(chunks)
            yield first
            if first.finish_reason is not None:
                return
            try:
                async for piece in chunks:
                    received += len(piece.token_ids)
                    if piece.finish_reason is not None:
                        await _drain(chunks)
                    yield piece
                    if piece.finish_reason is not None:
                        return
            except (RemoteError, httpx.TransportError) as e:
                raise StreamCut(
                    f"{url}: the stream broke after {received} tokens: {e}", received
                ) from e
            raise StreamCut(
                f"{url}: the stream ended after {received} tokens with no finish reason", received
            )

    async def _open(
        self, stack: contextlib.AsyncExitStack, body: dict[str, Any], url: str
    ) -> AsyncIterator[Completion]:
        """Send a streamed request (inside ``stack``: the concurrency limit, the response); the
        chunks that carry tokens or a finish reason, in order."""
        assert self.client is not None, "use the replica inside `async with`"
        self.num_requests += 1
        if self.limit is not None:
            await stack.enter_async_context(self.limit)
        resp = await stack.enter_async_context(
            self.client.stream("POST", "/v1/completions", json=body)
        )
        if resp.status_code != 200:
            await resp.aread()
            raise RemoteError(f"{url}: HTTP {resp.status_code}: {_message(resp)}", resp.status_code)
        chunks = _sse_completions(resp, url)
        stack.push_async_callback(chunks.aclose)
        return chunks

    async def prefix_cache(self) -> tuple[float, float] | None:
        """The server's prefix-cache counters now (:func:`prefix_cache_counters`), or ``None``."""
        assert self.client is not None
        try:
            resp = await self.client.get("/metrics", timeout=10.0)
        except httpx.HTTPError:
            return None
        return prefix_cache_counters(resp.text) if resp.status_code == 200 else None


async def _sse_completions(resp: httpx.Response, url: str) -> AsyncIterator[Completion]:
    """The completions chunks of an SSE response (:func:`parse_completion` each; the usage
    chunk and chunks with neither tokens nor a finish reason skipped); an error event raises
    :class:`RemoteError` (its status when it names one, else 500: retried before any token)."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise RemoteError(f"{url}: a stream event that is not JSON: {data[:200]!r}") from None
        if isinstance(chunk, dict) and "error" in chunk:
            err = (
                chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
            )
            code = err.get("code")
            raise RemoteError(f"{url}: error event: {str(err.get('message'))[:400]}",
                              code if isinstance(code, int) else 500)  # fmt: skip
        if isinstance(chunk, dict) and chunk.get("choices") == []:
            continue  # the usage
        piece = parse_completion(chunk, url)
        if piece.token_ids or piece.finish_reason is not None:
            yield piece


async def _drain(chunks: AsyncIterator[Completion]) -> None:
    """Read a finished stream to its end (``[DONE]``), so its connection can be reused."""
    with contextlib.suppress(RemoteError, httpx.TransportError):
        async for _ in chunks:
            pass


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:400]
    except ValueError:
        return resp.text[:400]


def _log_retry(state: Any) -> None:
    log.warning(
        "completions call failed (%s); retry %d", state.outcome.exception(), state.attempt_number
    )


def normalize_base_url(url: str) -> str:
    """``http://host:port``, ``http://host:port/`` and ``http://host:port/v1`` all name the server."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise ValueError(f"--base-url {url!r}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    return url[: -len("/v1")] if url.endswith("/v1") else url
