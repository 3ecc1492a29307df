"""Serving load: throughput and latency of ``multiverse serve`` at 1, 8 and 32 concurrent
clients, forking on vs off, on the shipped ``multiverse-tiny`` (held-out countdown problems).

A real server (uvicorn on 127.0.0.1, a free port, in this process's thread) and closed-loop
clients (threads with the official ``openai`` client, streaming with ``include_usage``): each
client sends its requests one after another. Forking off = the same prompt with
``parallel: false`` (the same model decoding its text plainly). Per (clients, forking) cell:

* ``req_per_s`` and ``tok_per_s`` (completion tokens of all branches / wall time);
* ``p50_s`` / ``p95_s`` request latency and ``ttft_p50_s`` (time to the first text);
* ``mean_tokens``: completion tokens per request (all branches).

Prints a table, then one JSON object on the last line. Bounded: ``--requests`` per cell (at
least one per client), ``--max-tokens`` per request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def start_server(llm: Any, max_concurrent: int) -> tuple[str, Any, Any, threading.Thread]:
    import socket

    import uvicorn

    from multiverse.server.app import ServerConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(llm, "tiny", ServerConfig(max_concurrent_requests=max_concurrent, max_queue=1024))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > end:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", app, server, thread


def run_cell(url: str, questions: list[str], clients: int, requests: int, parallel: bool,
             max_tokens: int) -> dict[str, Any]:  # fmt: skip
    import openai

    from multiverse.format.prompts import user_prompt

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    per_client = max(1, -(-requests // clients))
    lat, ttft, tokens = [], [], []
    lock = threading.Lock()

    def one(c: int) -> None:
        for r in range(per_client):
            q = questions[(c * per_client + r) % len(questions)]
            t0 = time.perf_counter()
            first = None
            usage = None
            stream = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": user_prompt(q)}], temperature=0,
                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                extra_body={"parallel": parallel})  # fmt: skip
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    usage = chunk.usage
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                ttft.append(first if first is not None else dt)
                tokens.append(usage.completion_tokens if usage else 0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(one, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "forking": parallel, "requests": len(lat), "wall_s": round(wall, 3),
            "req_per_s": round(len(lat) / wall, 3), "tok_per_s": round(sum(tokens) / wall, 1),
            "p50_s": round(_pct(lat, 0.5), 3), "p95_s": round(_pct(lat, 0.95), 3),
            "ttft_p50_s": round(_pct(ttft, 0.5), 3), "mean_tokens": round(statistics.mean(tokens), 1)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per cell (at least one per client)")
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cli.common's rule)")
    args = p.parse_args()

    from multiverse.cli.common import apply_threads
    from multiverse.engine.llm import LLM
    from multiverse.eval import tasks
    from multiverse.locations import find_model

    threads = apply_threads(args.threads)
    levels = [int(x) for x in args.clients.split(",") if x]
    questions = [t.question for t in tasks.generate(64, split="test", tasks=["countdown"])]
    llm = LLM(str(find_model()), num_kv_slots=1 << 16)
    url, app, server, thread = start_server(llm, max(levels))
    run_cell(url, questions[:2], 2, 2, True, 64)  # warm-up
    cells = []
    try:
        for clients in levels:
            for parallel in (True, False):
                cell = run_cell(url, questions, clients, max(args.requests, clients), parallel, args.max_tokens)
                cells.append(cell)
                print(f"clients {clients:>3}  forking {'on ' if parallel else 'off'}  {cell['req_per_s']:7.3f} req/s  "
                      f"{cell['tok_per_s']:8.1f} tok/s  p50 {cell['p50_s']:6.2f} s  p95 {cell['p95_s']:6.2f} s  "
                      f"ttft p50 {cell['ttft_p50_s']:5.2f} s", flush=True)  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.engine.close()
    by = {(c["clients"], c["forking"]): c for c in cells}
    speedup = {str(n): round(by[(n, False)]["p50_s"] / by[(n, True)]["p50_s"], 3) for n in levels}
    print(json.dumps({"benchmark": "serve_load", "model": "multiverse-tiny", "threads": threads,
                      "max_tokens": args.max_tokens, "cells": cells, "p50_speedup_forking": speedup}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
