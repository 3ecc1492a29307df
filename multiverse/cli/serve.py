"""``multiverse serve``: an OpenAI-compatible HTTP server over the fork/join engine.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health``. One engine thread owns the :class:`~multiverse.engine.llm.LLM` (the engine is
not thread safe): HTTP handlers put requests on a queue, the thread adds them to the running
batch between steps (continuous batching across clients) and resolves each request's future
when it finishes. Extensions to the OpenAI schema: ``parallel`` (forking on/off, default on),
``max_total_tokens``, and a ``multiverse`` object in the response (depth tokens, # parallel,
blocks, branches, the branch tree).

fastapi and uvicorn are imported lazily (extra ``server``).
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from multiverse.cli.common import (
    UsageError,
    add_device_arguments,
    add_model_argument,
    resolve_model,
)
from multiverse.engine.sampling import SamplingParams
from multiverse.eval.evaluate import DEFAULT_MAX_TOKENS
from multiverse.format.prompts import render_chat, stop_token_ids


class EngineThread:
    """Owns the engine; ``submit(prompt, params)`` returns a Future of a RequestOutput."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.inbox: queue.Queue[tuple[Any, SamplingParams, Future]] = queue.Queue()
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="multiverse-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: str | list[int], params: SamplingParams) -> Future:
        fut: Future = Future()
        if self.error is not None or not self.thread.is_alive():
            fut.set_exception(RuntimeError(f"engine thread is not running ({self.error!r})"))
            return fut
        self.inbox.put((prompt, params, fut))
        return fut

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        live: dict[int, tuple[Any, Future, float]] = {}
        try:
            self._serve(live)
        except BaseException as e:  # the thread must not die silently with clients waiting
            for _, fut, _ in live.values():
                if not fut.done():
                    fut.set_exception(RuntimeError(f"engine thread failed: {e!r}"))
            while not self.inbox.empty():
                self.inbox.get_nowait()[2].set_exception(RuntimeError(f"engine thread failed: {e!r}"))
            self.error = e
            raise

    def _serve(self, live: dict[int, tuple[Any, Future, float]]) -> None:
        while not self.stopped.is_set():
            try:  # block only when idle
                item = self.inbox.get(timeout=0.05) if not live else self.inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                prompt, params, fut = item
                try:
                    req = self.llm.add_request(prompt, params)
                    live[req.id] = (prompt, fut, time.perf_counter())
                except Exception as e:  # bad prompt: answer this client, keep serving
                    fut.set_exception(e)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            if not live:
                continue
            try:
                done = self.llm.step()
            except Exception as e:  # an engine failure must not hang the clients
                for _, fut, _ in live.values():
                    fut.set_exception(e)
                live.clear()
                continue
            for req in done:
                req.set_finish_time(time.perf_counter())
                if req.id in live:
                    prompt, fut, start = live.pop(req.id)
                    try:
                        fut.set_result(self.llm.output(req, prompt if isinstance(prompt, str) else None, start))
                    except Exception as e:  # never leave a client waiting
                        fut.set_exception(e)


def _params(body: dict[str, Any], eos_ids: list[int]) -> SamplingParams:
    stop = body.get("stop")
    return SamplingParams(
        temperature=float(body.get("temperature", 1.0)),
        top_p=float(body.get("top_p", 1.0)),
        top_k=int(body.get("top_k", -1)),
        seed=body.get("seed"),
        max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS),
        stop=stop,
        stop_token_ids=list(body.get("stop_token_ids") or []) + eos_ids,
        logprobs=bool(body.get("logprobs", False)),
        parallel=bool(body.get("parallel", True)),
        max_total_tokens=body.get("max_total_tokens"),
    )


def _usage(out: Any) -> dict[str, Any]:
    u = out.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}  # fmt: skip


def _extension(out: Any) -> dict[str, Any]:
    u = out.usage
    return {"depth_tokens": u.depth_tokens, "parallel_degree": round(u.parallel_degree, 4),
            "forced_tokens": u.forced_tokens, "blocks": u.blocks, "branches": u.branches,
            "seconds": round(u.seconds, 4), "tree": out.tree}  # fmt: skip


def create_app(llm: Any, model_name: str = "multiverse") -> Any:
    """The FastAPI app over ``llm`` (an :class:`~multiverse.engine.llm.LLM`)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    engine = EngineThread(llm)
    app = FastAPI(title="Multiverse", version="0.1")
    app.state.engine = engine
    tok = llm.tokenizer
    eos_ids = stop_token_ids(tok)  # chat turn end + EOS, as `multiverse eval` stops

    def run(prompt: Any, body: dict[str, Any]) -> Any:
        if body.get("stream"):
            raise HTTPException(400, "stream=true is not supported yet: send stream=false")
        if int(body.get("n", 1)) != 1:
            raise HTTPException(400, "only n=1 is supported")
        try:
            params = _params(body, eos_ids)
        except (TypeError, ValueError) as e:
            raise HTTPException(400, str(e)) from None
        try:
            return engine.submit(prompt, params).result(timeout=float(body.get("timeout", 600)))
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        except TimeoutError:
            raise HTTPException(504, "generation did not finish within the request timeout") from None
        except RuntimeError as e:
            raise HTTPException(500, str(e)) from None

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "multiverse"}]}

    @app.post("/v1/completions")
    def completions(body: dict[str, Any]) -> Any:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
            raise HTTPException(400, "prompt must be a string or a list of token ids")
        out = run(prompt, body)
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "text": out.text, "finish_reason": _finish(out), "logprobs": None}],
            "usage": _usage(out), "multiverse": _extension(out),
        })  # fmt: skip

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any]) -> Any:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise HTTPException(400, "messages must be a non-empty list of {role, content} objects with string content")
        prompt = render_chat(tok, messages)
        out = run(prompt, body)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": _finish(out)}],
            "usage": _usage(out), "multiverse": _extension(out),
        })  # fmt: skip

    return app


def _finish(out: Any) -> str:
    return "length" if out.finish_reason in ("length", "max_tokens", "max_total_tokens") else "stop"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    add_device_arguments(p)
    p.add_argument("--name", help="model name reported by /v1/models (default: the directory or file name)")


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        model = resolve_model(args.model)
    except UsageError as e:
        print(f"multiverse serve: error: {e}", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print("multiverse serve: error: needs the server extra: pip install 'multiverse[server]'", file=sys.stderr)
        return 2
    from multiverse.engine.llm import LLM

    print(f"loading {model} ...", file=sys.stderr)
    llm = LLM(str(model), device=args.device, dtype=args.dtype)
    app = create_app(llm, args.name or (model.stem if model.is_file() else model.name))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
