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

Streaming: ``stream: true`` is answered as Server-Sent Events, but the text comes in one chunk
when the request has finished (no live branch events: the driver's paths run on other servers).
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

from multiverse.format.prompts import encode_chat, render_chat, stop_token_ids
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
from multiverse.server.streaming import SSE_DONE, chat_chunk, completion_chunk, sse

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
    eos_ids = stop_token_ids(tok)
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

    async def run(request: Request, prompt: str | list[int], params: list[Any], timeout: float) -> list[Any]:
        """The outputs of ``params`` (one per choice), or an APIError; cancels on disconnect."""
        if state["waiting"] >= config.max_queue and slots.locked():
            metrics.rejected += len(params)
            raise APIError(429, "server busy", code="queue_full", headers={"Retry-After": "1"})
        state["waiting"] += 1
        try:
            await slots.acquire()
        finally:
            state["waiting"] -= 1
        state["running"] += 1
        task = asyncio.ensure_future(remote.agenerate([prompt] * len(params), params))
        deadline = time.monotonic() + timeout
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=POLL_S)
                if task.done():
                    break
                if await request.is_disconnected():
                    task.cancel()
                    metrics.aborted += len(params)
                    raise APIError(499, "client closed the request", code="client_closed")
                if time.monotonic() > deadline:
                    task.cancel()
                    metrics.timeouts += len(params)
                    raise APIError(504, "generation did not finish within the request timeout", "timeout",
                                   code="timeout")  # fmt: skip
            try:
                outs = task.result()
            except ValueError as e:  # the driver refused the prompt or the settings
                raise APIError(400, str(e), "prompt", code="invalid_prompt") from None
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            state["running"] -= 1
            slots.release()
        for o in outs:
            metrics.observe(o)
            if o.finish_reason == "error":
                metrics.errors += 1
        return outs

    async def generate(request: Request, body: Any, prompt: str | list[int], chat: bool) -> Any:
        if body.n > config.max_n:
            raise APIError(400, f"n must be <= {config.max_n} (the server's --max-n)", "n")
        if body.stream and (bool(body.logprobs) or (not chat and body.logprobs is not None)):
            raise APIError(400, "logprobs are not offered with stream=true yet", "logprobs")
        try:
            params = [sampling_params(body, eos_ids, i) for i in range(body.n)]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        outs = await run(request, prompt, params, body.timeout or config.request_timeout)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        if body.stream:
            return StreamingResponse(_stream(head, outs, chat), media_type="text/event-stream")
        made = (responses.chat_body(head, outs, tok, body.top_logprobs) if chat
                else responses.completion_body(head, outs, tok, body.return_token_ids))  # fmt: skip
        for choice, o in zip(made["choices"], outs, strict=True):
            choice["multiverse"]["merge"] = o.merge
        return JSONResponse(made)

    async def _stream(head: dict[str, Any], outs: list[Any], chat: bool) -> Any:
        for i, o in enumerate(outs):
            finish = responses.finish_reason(o)
            if chat:
                yield sse(chat_chunk(head, i, {"role": "assistant", "content": o.text}, finish))
            else:
                yield sse(completion_chunk(head, i, o.text, finish))
        yield SSE_DONE

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "backends": [i.base_url for i in remote.infos]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "multiverse", "multiverse": advert}]}  # fmt: skip

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
