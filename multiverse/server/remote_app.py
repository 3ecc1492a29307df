"""``multiverse serve --base-url``: our OpenAI-compatible API in front of a fleet of completions
servers (vLLM, SGLang, other ``multiverse serve`` s), through the fork/join driver
(:class:`multiverse.remote.RemoteLLM`).

The request path is the local server's: the same schemas (:mod:`.schemas`, ``sampling_params``),
chat rendering with the recorded SPEC 1.3 prompt format (:mod:`.prompting`), response bodies
(:mod:`.responses`, each choice's ``multiverse`` object naming the merge mode), OpenAI-shaped
errors, the API key and body limit (:mod:`.auth`), Prometheus metrics. Each request runs as a
task of the driver; a client that goes away, or a ``timeout`` that passes, cancels it, which
closes every sub-request it has in flight on the fleet. ``--max-concurrent-requests`` bounds the
requests in progress (more wait; beyond ``--max-queue`` waiting, 429).

Streaming (``stream: true``, docs/streaming.md) is the local server's, per token: the driver
streams its sub-requests and reports each piece it feeds to a request (``RemoteLLM.agenerate``'s
``on_progress``), and a :class:`~multiverse.server.streaming.BranchStreamer` per choice turns the
live tree into the text that is certain so far, its token ids (``return_token_ids``) and the
branch events (fork, delta, path_end, merge); the last chunk has the finish reason, the
``multiverse`` fields of the end (the merge mode among them) and, asked for, the usage.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from multiverse.format.prompts import encode_chat, render_chat
from multiverse.server import errors, remote_info, responses
from multiverse.server.auth import Guard
from multiverse.server.errors import APIError
from multiverse.server.metrics import Metrics
from multiverse.server.prompting import apply_prompt_format
from multiverse.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    completion_prompt,
    sampling_params,
)
from multiverse.server.streaming import (
    SSE_DONE,
    BranchStreamer,
    ChoiceChunks,
    chat_chunk,
    sse,
    usage_chunk,
)

POLL_S = 0.2  # how often a waiting handler checks that its client is still there


def create_remote_app(remote: Any, model_name: str, config: Any) -> FastAPI:
    """The app over ``remote`` (a :class:`~multiverse.remote.RemoteLLM`); ``config``: the
    local server's :class:`~multiverse.server.app.ServerConfig`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await remote.aclose()

    app = FastAPI(title="Multiverse (fork/join driver over a fleet)", version="0.2", lifespan=lifespan,
                  description="OpenAI-compatible server; generation runs on the --base-url servers.")  # fmt: skip
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    errors.install(app)
    tok = remote.tokenizer
    metrics = Metrics()
    state = {"running": 0, "waiting": 0}
    slots = asyncio.Semaphore(config.max_concurrent_requests)
    app.state.remote, app.state.metrics, app.state.load = remote, metrics, state
    remote_info.install(app, remote)
    advert = {"merge_modes": [remote.merge], "tag_ids": remote.tag_ids, "eos_token_ids": sorted(remote.eos_token_ids),
              "max_model_len": remote.max_model_len, "tokenizer": remote_info.TOKENIZER_ROUTE,
              "prompt_format": None if config.prompt_format is None else
              {"suffix": config.prompt_format.suffix, "source": config.prompt_format.source},
              "backends": [i.base_url for i in remote.infos]}  # fmt: skip

    def check_queue(n: int) -> None:
        """429 when every place is taken and the queue is full."""
        if state["waiting"] >= config.max_queue and slots.locked():
            metrics.rejected += n
            raise APIError(429, "server busy", code="queue_full", headers={"Retry-After": "1"})

    async def admit() -> None:
        """A place among the requests in progress (waiting for one); :func:`finish` frees it."""
        state["waiting"] += 1
        try:
            await slots.acquire()
        finally:
            state["waiting"] -= 1
        state["running"] += 1

    async def finish(task: asyncio.Future) -> None:
        """Cancel ``task`` unless done (closing its sub-requests on the fleet); free its place."""
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        state["running"] -= 1
        slots.release()

    async def watch(request: Request, task: asyncio.Future, n: int, deadline: float,
                    wake: asyncio.Event | None = None) -> None:  # fmt: skip
        """Return when ``task`` is done (or ``wake`` is set); cancel it and raise 499 when the
        client has gone, 504 at the deadline."""
        while not task.done() and not (wake is not None and wake.is_set()):
            waits = {task} if wake is None else {task, asyncio.ensure_future(wake.wait())}
            _, pending = await asyncio.wait(waits, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
            for w in pending - {task}:
                w.cancel()
            if task.done() or (wake is not None and wake.is_set()):
                return
            if await request.is_disconnected():
                task.cancel()
                metrics.aborted += n
                raise APIError(499, "client closed the request", code="client_closed")
            if time.monotonic() > deadline:
                task.cancel()
                metrics.timeouts += n
                raise APIError(504, "generation did not finish within the request timeout", "timeout",
                               code="timeout")  # fmt: skip

    def results(task: asyncio.Future) -> list[Any]:
        """The finished task's outputs (counted in the metrics), or a 400 for a refused prompt."""
        try:
            outs = task.result()
        except ValueError as e:  # the driver refused the prompt or the settings
            raise APIError(400, str(e), "prompt", code="invalid_prompt") from None
        for o in outs:
            metrics.observe(o)
            if o.finish_reason == "error":
                metrics.errors += 1
        return outs

    async def run(request: Request, prompt: str | list[int], params: list[Any], deadline: float) -> list[Any]:
        """The outputs of ``params`` (one per choice), or an APIError; cancels on disconnect."""
        check_queue(len(params))
        await admit()
        task = asyncio.ensure_future(remote.agenerate([prompt] * len(params), params))
        try:
            await watch(request, task, len(params), deadline)
            return results(task)
        finally:
            await finish(task)

    async def stream(request: Request, prompt: str | list[int], params: list[Any], head: dict[str, Any],
                     chat: bool, include_usage: bool, deadline: float, with_ids: bool) -> AsyncIterator[str]:  # fmt: skip
        """SSE chunks as the driver's trees grow (module docstring). The place is taken here, in
        the body, so a stream that never starts holds none (the queue was checked before).
        ``with_ids`` (``return_token_ids``): each chunk's new token ids, as the local server."""
        streamers = [BranchStreamer(tok, token_ids=with_ids) for _ in params]
        live: list[Any] = [None] * len(params)  # each choice's Request (its branch tree)
        ready: list[tuple[int, str, list[dict[str, Any]], list[int]]] = []
        wake = asyncio.Event()
        chunk = ChoiceChunks(head, chat, with_ids, len(params),  # the prompt's ids: the output has them too
                             lambda i, out: out.prompt_token_ids if out is not None else live[i].prompt_ids)  # fmt: skip

        def progress(index: int, req: Any) -> None:  # on the driver's task, between its awaits
            live[index] = req
            text, events = streamers[index].update(req)
            ids = streamers[index].ids
            if text or events or (with_ids and ids):
                ready.append((index, text, events, ids))
                wake.set()

        await admit()
        task = asyncio.ensure_future(remote.agenerate([prompt] * len(params), params, on_progress=progress))
        try:
            if chat:
                for i in range(len(params)):
                    yield sse(chat_chunk(head, i, {"role": "assistant", "content": ""}, None))
            while True:
                while ready:
                    yield chunk(*ready.pop(0))
                if task.done():
                    break
                wake.clear()
                try:
                    await watch(request, task, len(params), deadline, wake)
                except APIError as e:
                    if e.status != 499:  # a client that went away reads nothing more
                        yield sse(e.body())
                        yield SSE_DONE
                    return
            try:
                outs = results(task)
            except APIError as e:
                yield sse(e.body())
                yield SSE_DONE
                return
            for i, o in enumerate(outs):
                final_ids = responses.token_ids(o)["token_ids"]
                if live[i] is not None:
                    text, events = streamers[i].finish(live[i], o.text, final_ids)
                    ids = streamers[i].ids
                else:
                    text, events, ids = o.text, [], final_ids
                yield chunk(i, text, events, ids, out=o)
            if include_usage:
                yield sse(usage_chunk(head, chat, outs))
            yield SSE_DONE
        finally:
            await finish(task)

    async def generate(request: Request, body: Any, prompt: str | list[int], chat: bool) -> Any:
        if body.n > config.max_n:
            raise APIError(400, f"n must be <= {config.max_n} (the server's --max-n)", "n")
        if body.stream and (bool(body.logprobs) or (not chat and body.logprobs is not None)):
            raise APIError(400, "logprobs are not offered with stream=true yet", "logprobs")
        try:
            params = [sampling_params(body, i) for i in range(body.n)]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        deadline = time.monotonic() + min(body.timeout or config.request_timeout, config.request_timeout)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        if body.stream:
            check_queue(len(params))  # a full queue is a 429, before the stream starts
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            with_ids = not chat and body.return_token_ids
            return StreamingResponse(stream(request, prompt, params, head, chat, include_usage, deadline, with_ids),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        outs = await run(request, prompt, params, deadline)
        made = (responses.chat_body(head, outs, tok, body.top_logprobs) if chat
                else responses.completion_body(head, outs, tok, body.return_token_ids))  # fmt: skip
        for choice, o in zip(made["choices"], outs, strict=True):
            choice["multiverse"]["merge"] = o.merge
        return JSONResponse(made)

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "backends": [i.base_url for i in remote.infos]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return responses.models_body(model_name, advert)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_route() -> Any:
        return PlainTextResponse(metrics.render({"running": state["running"], "waiting": state["waiting"]}),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompt = completion_prompt(body)
        return await generate(request, body, prompt, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if body.parse_special_tokens and not config.allow_special_tokens:
            raise APIError(400, "parse_special_tokens is not allowed by this server (start it with "
                           "--allow-special-tokens, for trusted clients)", "parse_special_tokens")  # fmt: skip
        messages = apply_prompt_format(body.chat_messages(), config.prompt_format)
        if not render_chat(tok, messages):
            raise APIError(400, "the messages render to an empty prompt", "messages")
        # token ids: a message's contents are text (a tag or control token in it cannot fork or
        # forge a turn) unless the client may and asks, as on the local server
        prompt = encode_chat(tok, messages, special_tokens=body.parse_special_tokens)
        return await generate(request, body, prompt, chat=True)

    return app
