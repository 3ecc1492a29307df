"""The official ``openai`` client against a real server process (uvicorn on 127.0.0.1) over the
shipped tiny model: chat and completions, streaming and not, branch events vs the final tree."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import API_KEY

from multiverse.eval import tasks
from multiverse.format.prompts import user_prompt

QUESTIONS = [t.question for t in tasks.generate(3, split="test", tasks=["countdown"])]


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user_prompt(question)}]


def _extra(obj) -> dict:
    return obj.model_extra or {}


def test_models_health_and_auth(server, client):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # open without the key
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401


def test_openapi_shows_every_field(server):
    url, _ = server
    doc = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    schemas = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        fields = set(schemas[name]["properties"])
        assert {"parallel", "max_total_tokens", "max_depth", "max_paths", "max_live_branches", "timeout",
                "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                "logprobs"} <= fields, fields  # fmt: skip
    assert "top_logprobs" in schemas["ChatCompletionRequest"]["properties"]
    assert "/metrics" in doc["paths"] and "/v1/chat/completions" in doc["paths"]


def test_chat_streamed_equals_plain_and_branch_events_match_the_tree(client, server):
    msgs = _chat(QUESTIONS[0])
    plain = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=400)
    text = plain.choices[0].message.content
    ext = _extra(plain)["multiverse"]
    assert ext["blocks"] >= 1 and ext["parallel_degree"] > 1.2  # the shipped model forks here
    parts = [{"type": "text", "text": msgs[0]["content"][:20]}, {"type": "text", "text": msgs[0]["content"][20:]}]
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                            temperature=0, max_tokens=400, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    streamed, events, order, usage, finish = "", [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.content or ""
        assert text.startswith(streamed + delta)  # never rewritten: always a prefix of the final text
        streamed += delta
        finish = chunk.choices[0].finish_reason or finish
        for e in (_extra(chunk).get("multiverse") or {}).get("events", []):
            events.append(e)
            order.append((e["type"], len(streamed)))
    assert streamed == text and finish == plain.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens
    # the events: a fork with the tree's labels, deltas that rebuild each path, ends before the merge
    forks = [e for e in events if e["type"] == "fork"]
    merges = [e for e in events if e["type"] == "merge"]
    tree_block = ext["tree"]["blocks"][0]
    assert forks[0]["labels"] == [p["label"] for p in tree_block["paths"]]
    assert sorted(m["block"] for m in merges) == sorted(f["block"] for f in forks)
    first_merge = next(i for i, e in enumerate(events) if e["type"] == "merge")
    ended = {e["branch"] for e in events[:first_merge] if e["type"] == "path_end"}
    assert ended == set(forks[0]["paths"])
    branch_text: dict[str, str] = {}
    for e in events:
        if e["type"] == "delta":
            branch_text[e["branch"]] = branch_text.get(e["branch"], "") + e["text"]
    for name in forks[0]["paths"]:
        assert branch_text[name].startswith(f"<Path>\n{name}:") and branch_text[name].endswith("</Path>\n")
        assert branch_text[name] in text
    start = text.index(branch_text[forks[0]["paths"][0]])
    assert text[start:].startswith("".join(branch_text[n] for n in forks[0]["paths"]))  # outline order
    # paths stream live: branch deltas arrive before the canonical text reaches the merge
    fork_at = next(n for kind, n in order if kind == "fork")
    assert fork_at < text.index("<Conclusion>")


def test_completions_plain_and_streamed(client):
    kw = {"model": "tiny", "prompt": "Count down by 3 from a 10 as far as it goes.", "temperature": 0,
          "max_tokens": 24}  # fmt: skip
    plain = client.completions.create(**kw)
    assert plain.object == "text_completion" and plain.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == plain.choices[0].text
    again = client.completions.create(**kw)
    assert again.choices[0].text == plain.choices[0].text  # greedy is deterministic
    with_ids = client.completions.create(**{**kw, "prompt": [10, 20, 30]})
    assert with_ids.choices[0].finish_reason in ("stop", "length")


def test_n_seed_stop_and_logprobs(client):
    msgs = _chat(QUESTIONS[1])
    out = client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, seed=7, n=3, max_tokens=40)
    assert [c.index for c in out.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, seed=7, n=3, max_tokens=40)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    stopped = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=60, stop=["<Goal>"])
    assert "<Goal>" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8, logprobs=True)
    content = lp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == lp.choices[0].message.content
    assert all(t.logprob is None or t.logprob <= 0 for t in content)
    c = client.completions.create(model="tiny", prompt="a", max_tokens=5, temperature=0, logprobs=1)
    assert len(c.choices[0].logprobs.tokens) == len(c.choices[0].logprobs.token_logprobs)


def test_streamed_n_and_raw_sse(server):
    url, _ = server
    body = {"messages": _chat(QUESTIONS[2]), "temperature": 0, "max_tokens": 16, "n": 2, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
    assert texts[0] == texts[1] and texts[0]  # greedy: both choices agree


@pytest.mark.parametrize("stream", [False, True])
def test_request_timeout_aborts(client, server, stream):
    import openai

    with pytest.raises(openai.APIError) as info:
        out = client.chat.completions.create(model="tiny", messages=_chat(QUESTIONS[0]), temperature=0,
                                             max_tokens=400, stream=stream, extra_body={"timeout": 0.05})  # fmt: skip
        if stream:
            list(out)
    assert "timeout" in str(info.value)
