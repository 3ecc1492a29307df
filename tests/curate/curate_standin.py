"""A scripted stand-in for a REMOTE OpenAI-compatible LLM, for the curator's tests.

It knows records with a Multiverse ``chain`` (the synthetic task records of
``multiverse.eval.tasks``, or real traces): for each one it derives, from the record's own
``chain``, the replies a perfect curator LLM would give (:class:`curate_derived.Derived`: the step
tree over the units, the groups, each block's outlines, conclusion and opening edits). It is served as a real
HTTP server on 127.0.0.1 (``http.server`` in a thread, one thread per connection, a listen
backlog of 128, a free port) and can inject faults.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from curate_derived import Derived

from multiverse.format import grammar


def compact(steps: list[dict[str, Any]]) -> list[list[Any]]:
    """Steps in the summarise v2 reply form: ``[first, last, "summary"(, [sub-steps])]``."""
    return [[*s["units"], s["summary"], *([compact(s["substeps"])] if s.get("substeps") else [])] for s in steps]


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a client opening 16 connections at once (the
    # curator at --concurrency 16) overflowed it, and the kernel retransmits a dropped SYN only
    # after 1 s, so a few connections started a second late. Real servers (uvicorn under vLLM
    # and SGLang, nginx) listen with a backlog of 2048 or more.
    request_queue_size = 128


class StandIn:
    """The scripted server. ``faults[(question, step)]`` is a list of fault names used in
    order, one per request of that record and step (step: summarise|parallelise|mapreduce).

    Faults: ``429`` (with Retry-After), ``400``, ``401``, ``404``, ``500``, ``timeout`` (sleeps past the client's
    timeout), ``badjson``, ``length`` (truncated, finish_reason length), ``outlines`` (one
    outline too few), ``missing_edit`` (an edit whose find is absent), ``delete`` (edits
    deleting most of every path's first line).
    """

    def __init__(self, records: list[Any], latency: float = 0.0, timeout_sleep: float = 1.5):
        self.by_question = {r.question: Derived(r.chain) for r in records}
        self.faults: dict[tuple[str, str], list[str]] = {}
        self.always: dict[tuple[str, str], str] = {}
        self.latency = latency
        self.timeout_sleep = timeout_sleep
        self.requests: list[tuple[str, str]] = []
        self.authorization: set[str | None] = set()  # the Authorization headers received
        self.counts: dict[str, int] = defaultdict(int)
        self.connections = 0  # TCP connections accepted
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ replies
    def reply(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any] | None, str, str]:
        """(status, headers, body or None, content, finish_reason)."""
        user = payload["messages"][-1]["content"]
        data = json.loads(user[user.index("INPUT JSON:") + len("INPUT JSON:") :])
        step, question = data["step"], data["question"]
        with self.lock:
            self.requests.append((question, step))
            queue = self.faults.get((question, step), [])
            fault = queue.pop(0) if queue else self.always.get((question, step), "")
            self.counts[fault or "ok"] += 1
        if fault == "429":
            return 429, {"Retry-After": "0.05"}, {"error": "rate limited"}, "", ""
        if fault in ("401", "404"):  # a missing key / a wrong URL or model name
            return int(fault), {}, {"error": {"message": "invalid api key" if fault == "401" else "not found"}}, "", ""
        if fault == "400":  # this record's request is bad (e.g. over the model's context)
            return 400, {}, {"error": {"message": "bad request"}}, "", ""
        if fault == "500":
            return 500, {}, {"error": "boom"}, "", ""
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
        if fault == "badjson":
            return 200, {}, None, "Sure! Here is the plan: {steps: [1, 2", "stop"
        derived = self.by_question[question]
        if step == "summarise":
            content: Any = {"steps": compact(derived.steps)}
        elif step == "parallelise":
            content = {"groups": [g["steps"] for g in derived.groups]}  # v2: a group is its ids
        else:
            block = dict(derived.block(data["paths"]))
            if block["outlines"] == data.get("outlines"):  # the given outlines fit: left out (v2)
                del block["outlines"]
            if fault == "outlines":
                block["outlines"] = list(data["outlines"])[:-1]
            if fault == "missing_edit":
                block["edits"] = [{"path": 1, "find": "no such text here", "replace": "x"}]
            if fault == "delete":
                firsts = [grammar.flatten(p).split("\n")[0] for p in data["paths"]]
                block["edits"] = [{"path": k + 1, "find": f[: max(1, len(f) - 2)], "replace": ""} for k, f in enumerate(firsts)]
            content = block
        text = json.dumps(content)
        if fault == "length":
            return 200, {}, None, text[: len(text) // 2], "length"
        return 200, {}, None, text, "stop"

    # ------------------------------------------------------------------ server
    def start(self, port: int = 0) -> str:
        """Listen on 127.0.0.1:``port`` (0: a free port); returns the base URL."""
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with standin.lock:
                    standin.connections += 1

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                except (ConnectionError, ValueError):  # a client killed mid-request
                    return
                with standin.lock:
                    standin.authorization.add(self.headers.get("Authorization"))
                if standin.latency:
                    time.sleep(standin.latency)
                status, headers, err, content, finish = standin.reply(body)
                out = err if err is not None else {
                    "id": "standin", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": len(json.dumps(body)) // 4, "completion_tokens": len(content) // 4},
                }  # fmt: skip
                raw = json.dumps(out).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = _Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
