"""Through the server: every choice reports the seed it ran with (sent back, it replays the
choice) and whether it forked; presence / frequency penalties reach the engine."""

from __future__ import annotations

import httpx
from conftest import API_KEY

from multiverse.eval import tasks
from multiverse.format.prompts import user_prompt
from multiverse.server.schemas import ChatCompletionRequest, CompletionRequest, sampling_params

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = user_prompt(tasks.generate(1, split="test", tasks=["countdown"])[0].question)  # it forks


def _post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_each_choice_reports_its_seed_and_the_seed_replays_it(server):
    url, _ = server
    body = {
        "prompt": "q",
        "temperature": 1.0,
        "max_tokens": 48,
        "ignore_eos": True,
        "parallel": False,
    }
    first = _post(url, "/v1/completions", {**body, "n": 2})
    seeds = [c["multiverse"]["seed"] for c in first["choices"]]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]
    assert first["multiverse"]["seed"] == seeds[0]
    assert {c["multiverse"]["forking"] for c in first["choices"]} == {"off"}
    for choice, seed in zip(first["choices"], seeds, strict=True):
        again = _post(url, "/v1/completions", {**body, "seed": seed})
        assert again["choices"][0]["text"] == choice["text"]
        assert again["choices"][0]["multiverse"]["seed"] == seed
    chat = {
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0.7,
        "max_tokens": 400,
    }
    forked = _post(url, "/v1/chat/completions", chat)["choices"][0]
    assert forked["multiverse"]["forking"] == "on" and forked["multiverse"]["blocks"] >= 1
    replay = _post(url, "/v1/chat/completions", {**chat, "seed": forked["multiverse"]["seed"]})
    assert replay["choices"][0]["message"] == forked["message"]


def test_a_stream_reports_its_seed_and_the_seed_replays_it(server):
    """The last chunk of a streamed choice carries the seed it ran with, as a response does."""
    import json

    url, _ = server
    body = {"prompt": "q", "temperature": 1.0, "max_tokens": 32, "ignore_eos": True, "parallel": False}
    with httpx.stream("POST", url + "/v1/completions", headers=HEADERS, timeout=120,
                      json={**body, "stream": True}) as r:  # fmt: skip
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    ext = chunks[-1]["multiverse"]
    assert isinstance(ext["seed"], int) and ext["forking"] == "off"
    assert _post(url, "/v1/completions", {**body, "seed": ext["seed"]})["choices"][0]["text"] == text


def test_penalties_go_from_the_request_to_the_sampling_params():
    for body in (
        CompletionRequest(prompt="x", presence_penalty=0.5, frequency_penalty=-1.25),
        ChatCompletionRequest(
            messages=[{"role": "user", "content": "x"}],
            presence_penalty=0.5,
            frequency_penalty=-1.25,
        ),
    ):
        sp = sampling_params(body)
        assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -1.25)


def test_penalties_change_greedy_output_and_zero_changes_nothing(server):
    url, _ = server
    body = {
        "prompt": "q",
        "temperature": 0,
        "max_tokens": 48,
        "ignore_eos": True,
        "parallel": False,
    }
    base = _post(url, "/v1/completions", body)["choices"][0]["text"]
    zero = {**body, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    assert _post(url, "/v1/completions", zero)["choices"][0]["text"] == base
    for penalty in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.0}):
        assert _post(url, "/v1/completions", {**body, **penalty})["choices"][0]["text"] != base
