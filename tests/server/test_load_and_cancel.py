"""Load and cancellation against a real server: 64 concurrent streaming clients, clients that
drop their connection (aborted: KV freed, no more tokens), the bounded admission queue (429)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import API_KEY, running_server

from multiverse.eval import tasks
from multiverse.format.prompts import user_prompt
from multiverse.server.metrics import parse

AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTIONS = [t.question for t in tasks.generate(8, split="test", tasks=["countdown"])]


def metrics(url: str) -> dict[str, float]:
    return parse(httpx.get(url + "/metrics", headers=AUTH).text)


def wait_idle(url: str, within: float) -> dict[str, float]:
    """Poll until no request runs or waits and requests hold no KV slot (only the prefix cache)."""
    end = time.monotonic() + within
    while True:
        m = metrics(url)
        idle = m["multiverse_requests_running"] == 0 and m["multiverse_requests_waiting"] == 0
        if idle and m["multiverse_kv_slots_used"] == m["multiverse_kv_slots_cached"]:
            return m
        if time.monotonic() > end:
            raise AssertionError(f"not idle after {within} s: {m}")
        time.sleep(0.02)


def test_64_concurrent_streaming_clients(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def one(i: int) -> str:
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": user_prompt(QUESTIONS[i % 8])}],
            temperature=0, max_tokens=48, stream=True)  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(64) as ex:
        texts = list(ex.map(one, range(64)))
    assert all(texts) and all(texts[i] == texts[i % 8] for i in range(64))
    wait_idle(url, 5)


def test_disconnected_clients_are_aborted(server):
    url, app = server
    before = metrics(url)

    def drop(i: int) -> int:
        body = {"messages": [{"role": "user", "content": user_prompt(QUESTIONS[i])}], "temperature": 0,
                "max_tokens": 1000, "stream": True}  # fmt: skip
        got = 0
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
            for line in r.iter_lines():
                got += bool(line)
                if got >= 3:
                    break  # leaving the block closes the connection
        return got

    with ThreadPoolExecutor(8) as ex:
        assert all(n >= 3 for n in ex.map(drop, range(8)))
    m = wait_idle(url, 1.0)  # aborted within a second of the drop
    aborted = m["multiverse_requests_aborted_total"] - before["multiverse_requests_aborted_total"]
    assert aborted == 8, m
    tokens = m["multiverse_generation_tokens_total"]
    assert tokens - before["multiverse_generation_tokens_total"] < 8 * 400  # stopped well before their ends
    time.sleep(0.3)
    assert metrics(url)["multiverse_generation_tokens_total"] == tokens  # no more tokens for them
    app.state.engine.llm.check_invariants()
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 4}, headers=AUTH, timeout=30)
    assert r.status_code == 200  # and the server keeps serving


def test_non_streaming_disconnect_is_aborted(server):
    url, _ = server
    before = metrics(url)
    body = {"messages": [{"role": "user", "content": user_prompt(QUESTIONS[3])}], "temperature": 0,
            "max_tokens": 1000, "ignore_eos": True}  # fmt: skip (it cannot end before the client goes)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.3)
    end = time.monotonic() + 5  # the handler notices the disconnect (polled) and aborts
    while metrics(url)["multiverse_requests_aborted_total"] == before["multiverse_requests_aborted_total"]:
        assert time.monotonic() < end, "the disconnected request was not aborted"
        time.sleep(0.02)
    m = wait_idle(url, 1.5)
    assert m["multiverse_requests_aborted_total"] == before["multiverse_requests_aborted_total"] + 1


def test_queue_full_is_429_with_retry_after(tiny_llm):
    from multiverse.engine.llm import LLM
    from multiverse.server.app import ServerConfig

    # a second engine over the same weights (the session server's engine is idle meanwhile)
    llm = LLM.from_model(tiny_llm.model, tiny_llm.tokenizer, num_kv_slots=4096)
    cfg = ServerConfig(max_concurrent_requests=1, max_queue=1)
    with running_server(llm, cfg) as (url, app):
        body = {"prompt": "a", "max_tokens": 100, "ignore_eos": True, "temperature": 0}

        def post(_: int, max_tokens: int = 100) -> httpx.Response:
            return httpx.post(url + "/v1/completions", json={**body, "max_tokens": max_tokens}, timeout=60)

        engine = app.state.engine
        with ThreadPoolExecutor(2) as ex:  # one running, one waiting: the engine is full
            held = [ex.submit(post, i, 600) for i in range(2)]
            deadline = time.monotonic() + 30
            while len(engine.running) + len(engine.waiting) < 2:  # both admitted or queued
                assert time.monotonic() < deadline and not any(f.done() for f in held)
                time.sleep(0.002)
            busy = [post(i) for i in range(2)]  # while both are in: no room
            codes = [r.status_code for r in busy] + [f.result().status_code for f in held]
        assert sorted(codes) == [200, 200, 429, 429], codes
        assert busy[0].headers["retry-after"] == "1" and busy[0].json()["error"]["type"] == "rate_limit_error"
        assert post(0).status_code == 200  # free again once those finished
