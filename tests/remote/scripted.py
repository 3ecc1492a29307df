"""A SCRIPTED completions endpoint: no model. Its "model" continues any prompt with
``script(prompt_ids)`` (an iterator of token ids), as a stock engine would answer: OpenAI
``/v1/completions`` in token ids, ``max_tokens`` and ``stop_token_ids`` honoured (the stop token
kept last in ``token_ids``, as vLLM keeps it), no Multiverse advert (a stock engine: ``flat``).
It counts the requests in flight (now and at most), so tests can check what the driver sends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from fastapi import FastAPI, Request


class Script:
    def __init__(self, fn: Callable[[list[int]], Iterable[int]]) -> None:
        self.fn = fn
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0


def scripted_app(script: Script, model: str = "scripted") -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "max_model_len": 4096}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.json()
        script.calls += 1
        script.in_flight += 1
        script.max_in_flight = max(script.max_in_flight, script.in_flight)
        try:
            await asyncio.sleep(0.01)  # let the driver's other sub-requests arrive
            stops = set(body.get("stop_token_ids") or [])
            out, reason, stop = [], "length", None
            for tok in script.fn(list(body["prompt"])):
                out.append(int(tok))
                if tok in stops:
                    reason, stop = "stop", int(tok)
                    break
                if len(out) >= body["max_tokens"]:
                    break
            else:
                reason = "stop"
            return {"id": "cmpl-scripted", "object": "text_completion", "model": model,
                    "choices": [{"index": 0, "text": "(not read)", "token_ids": out, "finish_reason": reason,
                                 "stop_reason": stop, "logprobs": None}]}  # fmt: skip
        finally:
            script.in_flight -= 1

    return app
