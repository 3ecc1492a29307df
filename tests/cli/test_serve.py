"""`multiverse serve`: the OpenAI-compatible endpoints over a tiny random model (real engine)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from _engine_util import tiny_pair  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from multiverse.cli.serve import create_app  # noqa: E402
from multiverse.engine.llm import LLM  # noqa: E402
from multiverse.train.bpe import default_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def client():
    tok = default_tokenizer()
    hf, ours = tiny_pair(tok)
    llm = LLM.from_model(ours, tok, num_kv_slots=4096)
    app = create_app(llm, "tiny")
    with TestClient(app) as c:
        c.llm = llm
        yield c
    app.state.engine.close()


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()["data"]
    assert data[0]["id"] == "tiny"


def test_completion(client):
    body = {"prompt": "Sum the products.", "max_tokens": 12, "temperature": 0, "timeout": 60}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "text_completion" and isinstance(d["choices"][0]["text"], str)
    u = d["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] >= 1
    assert d["multiverse"]["parallel_degree"] >= 1.0
    again = client.post("/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == d["choices"][0]["text"]  # greedy is deterministic


def test_chat_and_concurrency(client):
    bodies = [
        {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 5 + i, "temperature": 0,
         "timeout": 60}
        for i in range(6)
    ]
    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda b: client.post("/v1/chat/completions", json=b), bodies))
    for b, r in zip(bodies, results):
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["choices"][0]["message"]["role"] == "assistant"
        assert d["multiverse"]["depth_tokens"] <= b["max_tokens"]
    solo = client.post("/v1/chat/completions", json=bodies[3]).json()
    assert solo["choices"][0]["message"]["content"] == results[3].json()["choices"][0]["message"]["content"]


def test_bad_requests_are_400(client):
    assert client.post("/v1/completions", json={"prompt": 3}).status_code == 400
    assert client.post("/v1/completions", json={"prompt": "x", "temperature": -1}).status_code == 400
    assert client.post("/v1/completions", json={"prompt": "x", "n": 100}).status_code == 400
    assert client.post("/v1/completions", json={"prompt": [10**9]}).status_code == 400
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "timeout": 60}).status_code == 200


def test_engine_failure_is_an_error_not_a_hang():
    """A failing engine answers every waiting client (500) instead of leaving it hanging."""

    class Broken:
        tokenizer = default_tokenizer()

        def add_request(self, prompt, params):
            return type("R", (), {"id": 1})()

        def step(self):
            raise RuntimeError("boom")

    app = create_app(Broken(), "broken")
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "timeout": 30})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    app.state.engine.close()
