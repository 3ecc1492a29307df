"""``multiverse serve --base-url`` streams as the local server does (docs/streaming.md): the text
that is certain so far while the fleet generates, branch events as paths open, grow and close,
and a last chunk with the finish reason, the ``multiverse`` fields and the usage. Against a real
``multiverse serve`` on the shipped tiny model, on a held-out prompt that forks."""

from __future__ import annotations

import json

import httpx
import pytest
from _serving import agenerate_and_close, sse_chunks
from conftest import API_KEY, FRONT_KEY, serve_app, slow_backend, tiny_problems, wait_idle
from scripted import Script, scripted_app

from multiverse.engine.sampling import SamplingParams
from multiverse.format.prompts import chat_prompt, user_prompt
from multiverse.remote import RemoteLLM

H = {"Authorization": f"Bearer {FRONT_KEY}"}


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
    chunks = sse_chunks(front, "/v1/completions", forking_body, H)
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
    local = sse_chunks(url, "/v1/completions", forking_body, {"Authorization": f"Bearer {API_KEY}"})
    via = sse_chunks(front, "/v1/completions", forking_body, H)
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
    chunks = sse_chunks(front, "/v1/chat/completions", body, H)
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


def test_the_front_streams_per_token_the_text_of_the_local_engine(front, tiny_local, tiny_server):
    """Per token (not per sub-request): for held-out prompts that fork, the streamed text equals
    the front's non-streamed text and the local engine's, is a prefix of it at every chunk, and
    comes in about as many chunks as the request has tokens."""
    tok = tiny_server[2].tokenizer
    prompts = [chat_prompt(tok, q) for q in tiny_problems(2)]
    local = tiny_local.generate(prompts, SamplingParams(temperature=0, max_tokens=1024))
    for prompt, ref in zip(prompts, local, strict=True):
        body = {"prompt": prompt, "temperature": 0, "max_tokens": 1024}
        whole = httpx.post(f"{front}/v1/completions", json=body, headers=H, timeout=300).json()[
            "choices"
        ][0]
        assert whole["multiverse"]["blocks"] >= 1 and whole["text"] == ref.text
        texts = [c["choices"][0]["text"] for c in sse_chunks(front, "/v1/completions", body, H)]
        assert "".join(texts) == ref.text
        sent = ""
        for t in texts:
            sent += t
            assert ref.text.startswith(sent)
        pieces = sum(1 for t in texts if t)
        assert pieces >= len(ref.token_ids) // 4, (
            pieces,
            len(ref.token_ids),
        )  # per token, not 4 per request


def test_streamed_sub_requests_give_the_reference_output(tiny_local, tiny_server):
    """The driver fed token by token from streams (what `serve --base-url` does for a streaming
    client) gives what it gives fed whole completions (the reference) and the local engine."""
    url, app, llm = tiny_server
    tok = llm.tokenizer
    prompts = [chat_prompt(tok, q) for q in tiny_problems(2)]
    params = SamplingParams(temperature=0, max_tokens=1024)
    local = tiny_local.generate(prompts, params)
    driver = RemoteLLM(url, api_key=API_KEY)
    whole = driver.generate(prompts, params)
    seen = [0, 0]

    def progress(index, req):
        seen[index] += 1

    outs = agenerate_and_close(driver, prompts, params, on_progress=progress)
    for out, ref, w, n in zip(outs, local, whole, seen, strict=True):
        assert out.token_ids == ref.token_ids == w.token_ids and out.text == ref.text
        assert out.finish_reason == ref.finish_reason and out.tree == ref.tree
        assert out.http_requests == w.http_requests  # one stream per completion
        assert n >= len(ref.token_ids) // 4  # progress per token
    for tree in driver.trees:
        tree.check_invariants()
    assert wait_idle(app, llm)


def test_the_front_streams_token_ids_as_the_local_server(front, tiny_server, forking_body):
    """`return_token_ids` through the front: per chunk the new ids, concatenated the
    non-streamed ids (the stop token last), the prompt's ids on the first chunk, as the local
    server streams them."""
    body = {**forking_body, "return_token_ids": True, "stream_options": None}
    whole = httpx.post(f"{front}/v1/completions", json=body, headers=H, timeout=300).json()
    want = whole["choices"][0]
    local = sse_chunks(
        tiny_server[0], "/v1/completions", body, {"Authorization": f"Bearer {API_KEY}"}
    )
    for chunks in (sse_chunks(front, "/v1/completions", body, H), local):
        choices = [c["choices"][0] for c in chunks]
        assert [t for c in choices for t in c["token_ids"]] == want["token_ids"]
        assert choices[0]["prompt_token_ids"] == want["prompt_token_ids"]
        assert choices[-1]["stop_reason"] == want["stop_reason"]
        assert sum(1 for c in choices if c["token_ids"]) > len(want["token_ids"]) // 4


@pytest.mark.parametrize(
    "settings",
    [{"temperature": 0.0, "stop": [" 50 47"]}, {"temperature": 0.7, "seed": 7}],
    ids=["stop-strings-in-paths", "sampled-seeded"],
)
def test_streamed_sub_requests_keep_stops_and_seeds(tiny_local, tiny_server, settings):
    """Streamed, a stop string met inside paths ends them as fed whole (and as the engine does);
    a seeded sampled request gives the same output (each completion carries the same seed)."""
    url, app, llm = tiny_server
    tok = llm.tokenizer
    prompt = chat_prompt(tok, tiny_problems(1)[0])
    params = SamplingParams(max_tokens=1024, **settings)
    driver = RemoteLLM(url, api_key=API_KEY)
    whole = driver.generate(prompt, params)[0]

    out = agenerate_and_close(driver, prompt, params, stream=True)[0]
    assert whole.usage.blocks >= 1 and out.token_ids == whole.token_ids and out.text == whole.text
    assert out.tree == whole.tree and out.finish_reason == whole.finish_reason
    if "stop" in settings:
        assert (
            " 50 47" not in out.text
            and out.token_ids == tiny_local.generate(prompt, params)[0].token_ids
        )
    assert wait_idle(app, llm)


def _forking_script(tok) -> Script:
    """A stock server whose "model" forks two paths, closes them and concludes (then EOS)."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    v = tok.get_vocab()
    goal = "<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>\n"

    def fn(ctx: list[int]):
        last = {
            t: max((i for i, x in enumerate(ctx) if x == v[t]), default=-1)
            for t in ("<Path>", "</Path>")
        }
        if v["<Conclusion>"] in ctx:
            return [*enc(" ok"), tok.eos_token_id]
        if last["<Path>"] > last["</Path>"]:
            return enc(" a b c</Path>")
        return enc(goal)

    return Script(fn)


def test_a_stock_server_is_streamed_once_a_whole_answer_showed_no_plugin():
    from multiverse.locations import find_model

    model = find_model()
    script = _forking_script(_tokenizer(model))
    with serve_app(scripted_app(script)) as url:
        driver = RemoteLLM(url, tokenizer=model, timeout=30)
        params = SamplingParams(temperature=0.0, max_tokens=200)
        whole = driver.generate("q?", params)[0]
        script.streamed.clear()
        out = _agenerate(driver, "q?", params)
    assert whole.usage.blocks == 1 and whole.finish_reason == "stop", whole.text
    assert out.token_ids == whole.token_ids and out.tree == whole.tree and out.merge == "flat"
    assert (
        script.streamed[0] is False and script.streamed.count(True) >= 3
    )  # the Map whole, then streams


def test_a_plugin_server_asked_for_flat_is_refused_when_streaming_too():
    from multiverse.locations import find_model

    model = find_model()
    script = _forking_script(_tokenizer(model))
    script.report = {"loaded": 0, "saved": 0}  # what a vLLM with the Multiverse plugin answers
    with serve_app(scripted_app(script)) as url:
        driver = RemoteLLM(url, tokenizer=model, timeout=30)
        out = _agenerate(driver, "q?", SamplingParams(temperature=0.0, max_tokens=200))
    assert out.finish_reason == "error" and "Multiverse plugin" in out.error
    assert True not in script.streamed  # never streamed from it


def _tokenizer(model):
    from multiverse.format.tokenizer import load_tokenizer

    return load_tokenizer(model)


def _agenerate(driver, prompt, params):
    return agenerate_and_close(driver, prompt, params, stream=True)[0]
