"""``multiverse serve --base-url`` streams as the local server does (docs/streaming.md): the text
that is certain so far while the fleet generates, branch events as paths open, grow and close,
and a last chunk with the finish reason, the ``multiverse`` fields and the usage. Against a real
``multiverse serve`` on the shipped tiny model, on a held-out prompt that forks."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import API_KEY, FRONT_KEY, slow_backend, tiny_problems, wait_idle

from multiverse.format.prompts import chat_prompt, user_prompt

H = {"Authorization": f"Bearer {FRONT_KEY}"}


def _chunks(url: str, path: str, body: dict, headers: dict) -> list[dict]:
    with httpx.stream(
        "POST", f"{url}{path}", json={**body, "stream": True}, headers=headers, timeout=300
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _events(chunks: list[dict]) -> list[dict]:
    return [e for c in chunks for e in (c.get("multiverse") or {}).get("events", [])]


def _branch_texts(events: list[dict]) -> dict[tuple[int, str], str]:
    texts: dict[tuple[int, str], str] = {}
    for e in events:
        if e["type"] == "delta":
            key = (e["block"], e["branch"])
            texts[key] = texts.get(key, "") + e["text"]
    return texts


@pytest.fixture(scope="module")
def forking_body(tiny_server):
    return {"prompt": chat_prompt(tiny_server[2].tokenizer, tiny_problems(1)[0]), "temperature": 0,
            "max_tokens": 1024, "seed": 5, "stream_options": {"include_usage": True}}  # fmt: skip


def test_the_front_streams_live_text_and_branch_events(front, tiny_server, forking_body):
    whole = httpx.post(f"{front}/v1/completions", json=forking_body, headers=H, timeout=300).json()
    final = whole["choices"][0]["text"]
    assert whole["choices"][0]["multiverse"]["blocks"] >= 1  # the prompt forks
    chunks = _chunks(front, "/v1/completions", forking_body, H)
    usage, chunks = chunks[-1], chunks[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    ends = [i for i, c in enumerate(chunks) if c["choices"][0]["finish_reason"] is not None]
    assert ends == [len(chunks) - 1]  # one choice, one last chunk
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == final  # a sequence of prefixes ending in the non-streamed text
    assert sum(1 for t in texts[:-1] if t) >= 2  # text arrives before the end, in pieces
    before_end = _events(chunks[:-1])
    kinds = [e["type"] for e in before_end]
    assert "fork" in kinds and "path_end" in kinds and "merge" in kinds  # live branch events
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    mv = last["multiverse"]
    assert mv["merge"] == "exact" and mv["seed"] == whole["choices"][0]["multiverse"]["seed"]
    assert mv["finish_reason"] == whole["choices"][0]["multiverse"]["finish_reason"]


def test_the_front_streams_the_local_servers_events(front, tiny_server, forking_body):
    """The same forks, and each path's deltas the same text, as the backend's own stream."""
    url = tiny_server[0]
    local = _chunks(url, "/v1/completions", forking_body, {"Authorization": f"Bearer {API_KEY}"})
    via = _chunks(front, "/v1/completions", forking_body, H)
    forks = [[e for e in _events(c) if e["type"] == "fork"] for c in (local, via)]
    assert forks[0] and forks[0] == forks[1]
    assert _branch_texts(_events(local)) == _branch_texts(_events(via))
    text = ["".join(c["choices"][0]["text"] for c in s if c["choices"]) for s in (local, via)]
    assert text[0] == text[1]


def test_the_front_streams_a_chat(front, tiny_server):
    body = {
        "messages": [{"role": "user", "content": user_prompt(tiny_problems(1)[0])}],
        "temperature": 0,
    }
    whole = httpx.post(f"{front}/v1/chat/completions", json=body, headers=H, timeout=300).json()
    chunks = _chunks(front, "/v1/chat/completions", body, H)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert any(e["type"] == "fork" for e in _events(chunks[:-1]))


def test_a_streaming_client_that_goes_away_frees_the_fleet(front, tiny_server, forking_body):
    url, app, llm = tiny_server
    with slow_backend(llm):  # sub-requests are in flight when the client goes
        with httpx.stream("POST", f"{front}/v1/completions", json={**forking_body, "stream": True},
                          headers=H, timeout=300) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # the first text has come: the client goes
        assert wait_idle(app, llm, 20.0), "a sub-request is still running on the backend"
