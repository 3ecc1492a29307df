"""Streamed ``/v1/completions`` with ``return_token_ids`` (vLLM's streamed form): each chunk
carries its new ``token_ids``, the first chunk the ``prompt_token_ids``, the last one the
``stop_reason``; the ids concatenated are the non-streamed response's ``token_ids``, the stop token
that ended it kept last. Against the real server on the shipped tiny model, on a prompt that
forks (the ids of the paths in outline order, as the merged output has them)."""

from __future__ import annotations

import httpx
import pytest
from _serving import sse_chunks
from conftest import API_KEY

from multiverse.format.prompts import chat_prompt
from multiverse.format.tokenizer import tag_ids

H = {"Authorization": f"Bearer {API_KEY}"}


def _stream(url: str, body: dict) -> list[dict]:
    return sse_chunks(url, "/v1/completions", body, H, timeout=120)


def _whole(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/completions", json=body, headers=H, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def forking(server):
    """A held-out countdown problem the shipped tiny model forks on, as it is asked it."""
    from multiverse.cli.demo_model import demo_problems
    from multiverse.eval.datasets import synthetic_tasks_for
    from multiverse.locations import find_model

    question = demo_problems(1, synthetic_tasks_for(find_model()).tasks)[0].question
    tok = server[1].llm.tokenizer
    return {
        "prompt": chat_prompt(tok, question),
        "temperature": 0,
        "max_tokens": 1024,
        "return_token_ids": True,
    }


def test_streamed_token_ids_are_the_non_streamed_ones_chunk_by_chunk(server, forking):
    url, app = server
    whole = _whole(url, forking)
    assert whole["multiverse"]["blocks"] >= 1  # the prompt forks
    chunks = [c for c in _stream(url, forking) if c["choices"]]
    choices = [c["choices"][0] for c in chunks]
    assert all("token_ids" in c and "stop_reason" in c for c in choices)
    ids = [t for c in choices for t in c["token_ids"]]
    assert ids == whole["token_ids"]
    assert "".join(c["text"] for c in choices) == whole["text"]
    assert (
        sum(1 for c in choices[:-1] if c["token_ids"]) > len(ids) // 4
    )  # about one chunk per step
    prompt_ids = app.llm.tokenizer.encode(forking["prompt"], add_special_tokens=False)
    assert choices[0]["prompt_token_ids"] == prompt_ids == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in choices[1:])
    assert choices[-1]["stop_reason"] == whole["stop_reason"]
    assert choices[-1]["finish_reason"] == whole["finish_reason"]


def test_a_stop_id_stays_last_in_the_streamed_ids_as_non_streamed(server, forking):
    url, app = server
    goal = tag_ids(app.llm.tokenizer)["</Goal>"]
    body = {**forking, "stop_token_ids": [goal]}
    whole = _whole(url, body)
    assert (
        whole["token_ids"][-1] == goal
        and whole["stop_reason"] == goal
        and whole["finish_reason"] == "stop"
    )
    choices = [c["choices"][0] for c in _stream(url, body) if c["choices"]]
    assert [t for c in choices for t in c["token_ids"]] == whole["token_ids"]
    assert choices[-1]["token_ids"][-1] == goal and choices[-1]["stop_reason"] == goal
    assert all(c["stop_reason"] is None for c in choices[:-1])
    assert "</Goal>" not in "".join(c["text"] for c in choices)  # the text leaves it out


def test_token_ids_are_sent_only_when_asked(server, forking):
    url, _ = server
    body = {**forking, "return_token_ids": False, "max_tokens": 16}
    choices = [c["choices"][0] for c in _stream(url, body) if c["choices"]]
    assert choices and all("token_ids" not in c and "prompt_token_ids" not in c for c in choices)
