"""The FastAPI app: ``create_app(llm, model_name, config)``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
Server-Sent Events, :mod:`.streaming`), ``GET /v1/models``, ``GET /metrics`` (Prometheus),
``GET /health`` (never behind the API key). Handlers are async: they hand :class:`Job` s to
the :class:`EngineThread` and await their results on an ``asyncio.Queue``; a client that goes
away (streaming or not) has its generation aborted, and so has one whose ``timeout`` passes.
Errors are OpenAI-shaped (:mod:`.errors`), the API key and body limit are :mod:`.auth`'s.
Chats get ``ServerConfig.prompt_format``'s suffix on their last user turn (:mod:`.prompting`);
message contents are text (special tokens and tags in them stay characters,
:func:`~multiverse.format.prompts.encode_chat`) unless the request sets
``parse_special_tokens`` and the server allows it (``--allow-special-tokens``).
A request's ``timeout`` is capped at the server's ``request_timeout``; the handler answers 504
at the deadline even while its job waits in the queue (the engine never admits an expired job).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from multiverse.format.prompts import encode_chat, render_chat
from multiverse.server import errors, remote_info, responses
from multiverse.server.auth import Guard
from multiverse.server.engine_thread import EngineStopped, EngineThread, Job, QueueFull
from multiverse.server.errors import APIError, error_body
from multiverse.server.prompting import PromptFormat, apply_prompt_format
from multiverse.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    completion_prompt,
    sampling_params,
)
from multiverse.server.streaming import SSE_DONE, ChoiceChunks, chat_chunk, sse, usage_chunk

POLL_S = 0.2  # how often a waiting handler checks that its client is still there
log = logging.getLogger("multiverse.server")


@dataclass(slots=True)
class ServerConfig:
    """Limits and exposure of one server (the ``multiverse serve`` options)."""

    api_key: str | None = None
    max_queue: int = 256  # requests waiting beyond the running ones; then 429
    max_concurrent_requests: int = 64  # requests (each of ``n``) in the engine's batch at once
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    request_timeout: float = 600.0  # seconds: a request's ``timeout`` default and cap
    shutdown_timeout: float = 30.0
    prompt_format: PromptFormat | None = None
    """The SPEC 1.3 suffix chat requests get on their last user message (``multiverse serve``:
    the one the model records); ``None``: chats are rendered as sent. Completions never change."""
    allow_special_tokens: bool = False
    """Honour a chat request's ``parse_special_tokens`` (special tokens and tags written in its
    messages become tokens): for trusted clients only; otherwise such a request gets 400."""


def create_app(llm: Any, model_name: str = "multiverse", config: ServerConfig | None = None) -> FastAPI:
    """The app over ``llm`` (an :class:`~multiverse.engine.llm.LLM`); ``app.state.engine`` is
    its :class:`EngineThread` (started here, closed at the app's shutdown)."""
    cfg = config or ServerConfig()
    engine = EngineThread(llm, cfg.max_concurrent_requests, cfg.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.drain, cfg.shutdown_timeout)
        engine.close()

    app = FastAPI(title="Multiverse", version="0.2", lifespan=lifespan,
                  description="OpenAI-compatible server over the Multiverse fork/join engine.")  # fmt: skip
    app.state.engine, app.state.config = engine, cfg
    app.add_middleware(Guard, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    errors.install(app)
    tok = llm.tokenizer
    model = getattr(llm, "model", None)
    vocab = getattr(model, "vocab_size", None)

    async def generate(request: Request, body: Any, prompt: str | list[int], chat: bool) -> Any:
        if body.n > cfg.max_n:
            raise APIError(400, f"n must be <= {cfg.max_n} (the server's --max-n)", "n")
        wants_logprobs = bool(body.logprobs) or (not chat and body.logprobs is not None)
        if body.stream and wants_logprobs:
            raise APIError(400, "logprobs are not offered with stream=true yet", "logprobs")
        try:
            params = [sampling_params(body, i) for i in range(body.n)]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def sink(msg: tuple[Any, ...]) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(inbox.put_nowait, msg)

        timeout = min(body.timeout or cfg.request_timeout, cfg.request_timeout)  # the operator's cap
        deadline = time.monotonic() + timeout
        with_ids = body.stream and not chat and body.return_token_ids  # each chunk's token ids
        jobs = [Job(prompt, p, sink, index=i, stream=body.stream, token_ids=with_ids, timeout=timeout)
                for i, p in enumerate(params)]  # fmt: skip
        for job in jobs[1:]:
            job.after = jobs[0]  # the other choices start from the first one's cached prompt
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), code="unavailable") from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(request, inbox, jobs, head, chat, include_usage, deadline, with_ids),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        outs = await collect(request, inbox, jobs, deadline)
        if chat:
            top = body.top_logprobs
            return JSONResponse(responses.chat_body(head, outs, tok, top))
        return JSONResponse(responses.completion_body(head, outs, tok, body.return_token_ids))

    async def next_message(request: Request, inbox: asyncio.Queue, jobs: list[Job],
                           deadline: float) -> tuple[Any, ...] | None:  # fmt: skip
        """The next engine message, or None once the client has gone (its jobs are cancelled);
        at ``deadline`` a ``timeout`` message of our own (the jobs are cancelled: a job still
        queued is answered now, not when the engine gets to it)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                engine.cancel(jobs, timed_out=True)
                return ("timeout", 0, None, None)
            try:
                return await asyncio.wait_for(inbox.get(), min(POLL_S, left))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(jobs)
                    return None

    def ended_error(kind: str, payload: Any) -> APIError | None:
        """The error answer of a job that ended with ``kind`` (None: it finished)."""
        if kind == "error":
            return engine_error(payload)
        if kind == "timeout":
            return APIError(504, "generation did not finish within the request timeout", "timeout", code="timeout")
        if kind == "shutdown":
            return APIError(503, "the server is shutting down: the generation was aborted", code="shutdown",
                            headers={"Retry-After": "1"})  # fmt: skip
        return None

    async def collect(request: Request, inbox: asyncio.Queue, jobs: list[Job], deadline: float) -> list[Any]:
        outs: list[Any] = [None] * len(jobs)
        left = len(jobs)
        try:
            while left:
                msg = await next_message(request, inbox, jobs, deadline)
                if msg is None:
                    raise APIError(499, "client closed the request", code="client_closed")
                kind, index, payload, _ = msg
                if kind == "chunk":
                    continue
                err = ended_error(kind, payload)
                if err is not None:
                    raise err
                outs[index] = payload
                left -= 1
        finally:
            engine.cancel([j for j in jobs if not j.finished])  # another choice failed, or we were cancelled
        return outs

    async def stream(request: Request, inbox: asyncio.Queue, jobs: list[Job], head: dict[str, Any], chat: bool,
                     include_usage: bool, deadline: float, with_ids: bool = False) -> AsyncIterator[str]:  # fmt: skip
        outs: list[Any] = [None] * len(jobs)
        left = len(jobs)
        # the prompt's ids: job.req was set on the engine thread before its first message
        chunk = ChoiceChunks(head, chat, with_ids, len(jobs), lambda i, out: jobs[i].req.prompt_ids)

        try:
            if chat:
                for i in range(len(jobs)):
                    yield sse(chat_chunk(head, i, {"role": "assistant", "content": ""}, None))
            while left:
                msg = await next_message(request, inbox, jobs, deadline)
                if msg is None:
                    return
                kind, index, payload, rest = msg
                err = ended_error(kind, payload)
                if err is not None:
                    yield sse(err.body())
                    yield SSE_DONE
                    return
                if kind == "chunk":
                    yield chunk(index, *rest)
                    continue
                outs[index] = payload
                left -= 1
                yield chunk(index, *rest, out=payload)
            if include_usage:
                yield sse(usage_chunk(head, chat, outs))
            yield SSE_DONE
        finally:
            engine.cancel([j for j in jobs if not j.finished])

    def engine_error(e: Any) -> APIError:
        if isinstance(e, ValueError):  # the engine refused the prompt
            return APIError(400, str(e), "prompt", code="invalid_prompt")
        # logged with its traceback where it happened (the engine thread)
        return APIError(500, f"engine error: {type(e).__name__}: {e}", code="engine_error")

    @app.get("/health")
    async def health() -> Any:
        if not engine.alive:
            return JSONResponse(error_body(f"engine thread failed: {engine.error!r}", "server_error"), 503)
        return {"status": "ok"}

    advert = remote_info.advert(llm, cfg.prompt_format)  # what the fork/join driver needs
    remote_info.install(app, llm)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return responses.models_body(model_name, advert)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Any:
        return PlainTextResponse(engine.metrics.render(engine.snapshot),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """OpenAI completions; ``stream: true`` streams SSE chunks with ``multiverse`` events."""
        prompt = completion_prompt(body)
        if isinstance(prompt, list) and vocab is not None and any(t >= vocab for t in prompt):
            bad = [t for t in prompt if t >= vocab][:5]
            raise APIError(400, f"prompt token ids outside the vocabulary [0, {vocab}): {bad}", "prompt")
        return await generate(request, body, prompt, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI chat completions; ``content`` is a string or a list of text parts."""
        if body.parse_special_tokens and not cfg.allow_special_tokens:
            raise APIError(400, "parse_special_tokens is not allowed by this server (start it with "
                           "--allow-special-tokens, for trusted clients; or send token ids to /v1/completions)",
                           "parse_special_tokens")  # fmt: skip
        messages = apply_prompt_format(body.chat_messages(), cfg.prompt_format)
        if not render_chat(tok, messages):
            raise APIError(400, "the messages render to an empty prompt", "messages")
        # tokenised on the engine thread; contents are text unless the client may and asks
        prompt = functools.partial(encode_chat, messages=messages, special_tokens=body.parse_special_tokens)
        return await generate(request, body, prompt, chat=True)

    return app
