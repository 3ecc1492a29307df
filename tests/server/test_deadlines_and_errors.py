"""Against real servers over the shipped tiny model: a request's timeout counts from its
arrival (queue included) and is capped by the server's; a ``malformed`` finish reaches OpenAI
clients as ``stop`` with the engine's reason in ``multiverse.finish_reason``; text that is not
valid Unicode is a 400; an engine failure is logged with its traceback."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
from conftest import API_KEY, running_server

from multiverse.server import app as app_module
from multiverse.server.metrics import parse

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"prompt": "a", "max_tokens": 8000, "ignore_eos": True, "temperature": 0}  # many seconds on the tiny model


@pytest.fixture(scope="module")
def one_at_a_time(tiny_llm):
    """A server that runs one request at a time and caps every timeout at 3 s."""
    from multiverse.engine.llm import LLM
    from multiverse.server.app import ServerConfig

    llm = LLM.from_model(tiny_llm.model, tiny_llm.tokenizer, num_kv_slots=8192)
    cfg = ServerConfig(api_key=API_KEY, max_concurrent_requests=1, request_timeout=3.0)
    with running_server(llm, cfg) as (url, _):
        yield url, llm


def _post_later(url: str, path: str, body: dict, done: dict, name: str) -> threading.Thread:
    def go() -> None:
        r = httpx.post(url + path, json=body, headers=AUTH, timeout=120)
        done[name] = (r, time.monotonic())

    t = threading.Thread(target=go)
    t.start()
    return t


def test_a_queued_request_times_out_in_the_queue_and_is_never_run(one_at_a_time):
    url, llm = one_at_a_time
    before = llm._next_id  # requests the engine has taken so far
    timeouts = _timeouts(url)
    done: dict[str, tuple[httpx.Response, float]] = {}
    a = _post_later(url, "/v1/completions", LONG, done, "running")  # capped at the server's 3 s
    end = time.monotonic() + 30
    while llm._next_id == before:  # wait until it runs
        assert time.monotonic() < end
        time.sleep(0.01)
    b = _post_later(url, "/v1/completions", {**LONG, "timeout": 0.5}, done, "queued")
    a.join(60), b.join(60)
    assert done["queued"][0].status_code == 504 and done["queued"][0].json()["error"]["code"] == "timeout"
    assert done["queued"][1] < done["running"][1]  # answered at its own deadline, not after the running one
    assert llm._next_id == before + 1  # the queued one was never admitted (never prefilled)
    end = time.monotonic() + 10
    while _timeouts(url) < timeouts + 2:  # both counted as timeouts (the running one: at the cap)
        assert time.monotonic() < end, (_timeouts(url), timeouts)
        time.sleep(0.05)


def _timeouts(url: str) -> float:
    return parse(httpx.get(url + "/metrics", headers=AUTH, timeout=10).text)["multiverse_requests_timeout_total"]


def test_a_client_timeout_cannot_exceed_the_servers(one_at_a_time):
    url, _ = one_at_a_time
    r = httpx.post(url + "/v1/completions", json={**LONG, "timeout": 3600}, headers=AUTH, timeout=120)
    assert r.status_code == 504, r.text[:200]  # the operator's 3 s, not the client's hour


@pytest.fixture()
def malformed(monkeypatch):
    """Every completion's "model" writes ``<Parallel>`` over and over (the engine's forced-output hook)."""
    real = app_module.sampling_params

    def forced(body, i=0):
        sp = real(body, i)
        sp.forced_output = "<Parallel>" * 50
        return sp

    monkeypatch.setattr(app_module, "sampling_params", forced)


def test_malformed_is_stop_with_the_engine_reason(server, malformed):
    url = server[0]
    body = {"prompt": "a", "max_tokens": 40, "temperature": 0}
    d = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
    assert d["choices"][0]["finish_reason"] == "stop"
    assert d["choices"][0]["multiverse"]["finish_reason"] == "malformed"
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], **body, "stream": True}) as r:  # fmt: skip
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    last = json.loads(lines[-2])
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["multiverse"]["finish_reason"] == "malformed"


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages"),
    ("/v1/completions", '{"prompt": "x\\udfff", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["\\ud800"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 2, "stop": ["\\ud800"]}', "stop"),
])  # fmt: skip
def test_lone_surrogates_are_400(server, path, raw, param):
    r = httpx.post(server[0] + path, content=raw.encode(), timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]


def test_an_engine_failure_is_logged_with_its_traceback(caplog):
    from fastapi.testclient import TestClient

    from multiverse.server.app import create_app
    from multiverse.train.bpe import default_tokenizer

    class Broken:
        tokenizer = default_tokenizer()

        def add_request(self, prompt, params):
            return type("R", (), {"id": 1})()

        def step(self):
            raise RuntimeError("boom in the step")

    app = create_app(Broken(), "broken")
    with caplog.at_level(logging.ERROR, logger="multiverse.server"), TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "timeout": 30})
    app.state.engine.close()
    assert r.status_code == 500 and "RuntimeError: boom in the step" in r.json()["error"]["message"]
    logged = [rec for rec in caplog.records if rec.exc_info and "boom in the step" in str(rec.exc_info[1])]
    assert logged, [rec.getMessage() for rec in caplog.records]


def test_a_request_failing_in_the_engine_keeps_its_traceback_and_says_why(tiny_llm, caplog):
    """``finish_reason="error"``: the message goes to the client (``multiverse.error``), the
    traceback to the log."""
    from fastapi.testclient import TestClient

    from multiverse.engine.llm import LLM
    from multiverse.server.app import create_app

    llm = LLM.from_model(tiny_llm.model, tiny_llm.tokenizer, num_kv_slots=2048)

    def kaboom(works):
        raise RuntimeError("kaboom in the runner")

    llm.runner.run = kaboom
    app = create_app(llm, "failing")
    with caplog.at_level(logging.ERROR, logger="multiverse"), TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "timeout": 30})
    app.state.engine.close()
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "error"
    assert choice["multiverse"]["error"] == "RuntimeError: kaboom in the runner"
    assert any(rec.exc_info and "kaboom" in str(rec.exc_info[1]) for rec in caplog.records)
