"""Bad input never gives a 500: hand-written cases and a property test over the request fields,
against the real server; every refusal is an OpenAI error object."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import API_KEY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "hi"}]


def post(url: str, path: str, body=None, raw: bytes | None = None, headers=None) -> httpx.Response:
    h = {**AUTH, **(headers or {})}
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={**h, "content-type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, headers=h, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


CASES = [
    ("/v1/completions", {"prompt": 3}, "prompt"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": 0}, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 5}, "n"),  # over the server's --max-n 4
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 100}, "stop"),
    ("/v1/completions", {"prompt": "x", "max_total_tokens": -3}, "max_total_tokens"),
    ("/v1/completions", {"prompt": "x", "max_paths": 0}, "max_paths"),
    ("/v1/completions", {"prompt": "x", "max_depth": -1}, "max_depth"),
    ("/v1/completions", {"prompt": "x", "parallel": "maybe"}, "parallel"),
    ("/v1/completions", {"prompt": "x", "timeout": 0}, "timeout"),
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream": True, "logprobs": 1}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-5]}, None),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     None),  # fmt: skip
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, None),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 9}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": "x"}}, None),
]


@pytest.mark.parametrize(("path", "body", "param"), CASES)
def test_bad_requests_are_400(server, path, body, param):
    assert_error(post(server[0], path, body), 400, param)


def test_bad_bodies(server):
    url, _ = server
    assert_error(post(url, "/v1/completions", raw=b"{not json"), 400)
    assert_error(post(url, "/v1/completions", raw=b'{"prompt": "\xff\xfe"}'), 400)  # invalid UTF-8
    assert_error(post(url, "/v1/completions", raw=b"[1, 2]"), 400)
    assert_error(post(url, "/v1/completions", raw=b""), 400)
    big = {"prompt": "x" * (1 << 20)}  # a 1 MB prompt: over the body limit
    assert_error(post(url, "/v1/completions", big), 413)
    r = httpx.get(url + "/v1/nothing", headers=AUTH)
    assert_error(r, 404)
    assert_error(httpx.get(url + "/v1/completions", headers=AUTH), 405)


def test_chunked_body_over_the_limit(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 32768
        yield b'"}'

    r = httpx.post(server[0] + "/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert_error(r, 413)


def test_prompt_longer_than_the_kv_pool(server):
    ids = [5] * 20000  # the pool holds 16384 tokens
    assert_error(post(server[0], "/v1/completions", {"prompt": ids, "max_tokens": 2}), 400, "prompt")


JSONS = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=6)  # fmt: skip
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
          "stream_options", "logprobs", "top_logprobs", "parallel", "max_total_tokens", "max_depth", "max_paths",
          "max_live_branches", "stop_token_ids", "timeout", "ignore_eos"]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(chat=st.booleans(), fields=st.dictionaries(st.sampled_from(FIELDS), JSONS, max_size=4))
def test_fuzzed_fields_never_500(server, chat, fields):
    body = {"messages": CHAT} if chat else {"prompt": "a"}
    body.update(fields)
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 4:
        body.setdefault("max_tokens", 4)
        if isinstance(body["max_tokens"], int) and body["max_tokens"] > 4:
            body["max_tokens"] = 4
    body["max_total_tokens"] = 32 if isinstance(body.get("max_total_tokens"), int) else body.get("max_total_tokens")
    body["timeout"] = 10
    r = post(server[0], "/v1/chat/completions" if chat else "/v1/completions", raw=json.dumps(body).encode())
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
