"""A SCRIPTED completions endpoint: no model. Its "model" continues any prompt with
``script(prompt_ids)`` (an iterator of token ids), as a stock engine would answer: OpenAI
``/v1/completions`` in token ids, ``max_tokens`` and ``stop_token_ids`` honoured (the stop token
kept last in ``token_ids``, as vLLM keeps it), no Multiverse advert (a stock engine: ``flat``).
It counts the requests in flight (now and at most), so tests can check what the driver sends.
``stream: true`` is answered as vLLM streams: one token per SSE chunk (``token_ids``), the finish
and stop reasons on the last. ``report``: a whole response also carries it as
``kv_transfer_params.multiverse``, as a vLLM with the Multiverse plugin does (streams do not)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse


class Script:
    def __init__(
        self, fn: Callable[[list[int]], Iterable[int]], report: dict[str, Any] | None = None
    ) -> None:
        self.fn = fn
        self.report = report
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self.streamed: list[bool] = []  # per call: was it asked with stream: true


def scripted_app(script: Script, model: str = "scripted") -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "max_model_len": 4096}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await request.json()
        script.calls += 1
        script.streamed.append(bool(body.get("stream")))
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
            if body.get("stream"):
                return StreamingResponse(
                    _sse(model, out, reason, stop), media_type="text/event-stream"
                )
            whole = {"id": "cmpl-scripted", "object": "text_completion", "model": model,
                     "choices": [{"index": 0, "text": "(not read)", "token_ids": out, "finish_reason": reason,
                                  "stop_reason": stop, "logprobs": None}]}  # fmt: skip
            if script.report is not None:
                whole["kv_transfer_params"] = {"multiverse": script.report}
            return whole
        finally:
            script.in_flight -= 1

    return app


async def _sse(model: str, out: list[int], reason: str, stop: int | None):
    for i, tok in enumerate(out):
        last = i == len(out) - 1
        choice = {"index": 0, "text": "(not read)", "token_ids": [tok], "finish_reason": reason if last else None,
                  "stop_reason": stop if last else None, "logprobs": None}  # fmt: skip
        yield f"data: {json.dumps({'id': 'cmpl-scripted', 'model': model, 'choices': [choice]})}\n\n"
    if not out:
        choice = {
            "index": 0,
            "text": "",
            "token_ids": [],
            "finish_reason": reason,
            "stop_reason": stop,
        }
        yield f"data: {json.dumps({'id': 'cmpl-scripted', 'model': model, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"
