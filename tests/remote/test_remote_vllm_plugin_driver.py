"""The driver's side of exact merges on a vLLM with the Multiverse plugin, against a scripted
endpoint that answers as such a vLLM does (every response carries the connector's report in
``kv_transfer_params.multiverse``): asked for ``exact``, the driver finds the plugin, sends one
closing request per ended path (its whole sequence, ``</Path>`` and the separator included, one
token) and the merged request only after all of them; an error in a report ends the request with
it; without ``exact`` the plugin's server is refused by name, and ``exact`` is refused where no
plugin answers."""

from __future__ import annotations

import asyncio

import pytest
from conftest import serve_app
from fastapi import FastAPI, Request

from multiverse.engine.sampling import SamplingParams
from multiverse.format.tokenizer import load_tokenizer
from multiverse.locations import find_model
from multiverse.remote import RemoteLLM

GOAL2 = "<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(find_model())


def plugin_app(
    tok, log: list[dict], report: bool = True, close_error: str | None = None
) -> FastAPI:
    """Map: the Goal; a path: `` x</Path>``; after the Conclusion: `` done`` + EOS."""
    v = tok.get_vocab()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "mv", "object": "model", "max_model_len": 4096}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.json()
        ids = list(body["prompt"])
        log.append(body)
        await asyncio.sleep(0.01)
        closing = len(ids) >= 2 and ids[-2] == v["</Path>"]
        if closing:
            out = enc(" z")
        elif v["<Conclusion>"] in ids:
            out = [*enc(" done"), tok.eos_token_id]
        elif ids.count(v["<Path>"]) and ids[-1] != v["</Goal>"]:
            out = [*enc(" x"), v["</Path>"]]
        else:
            out = enc(GOAL2)
        stops = set(body.get("stop_token_ids") or [])
        cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
        out = out[: min(cut, body["max_tokens"])]
        err = close_error if closing else None
        rep = (
            {"multiverse": {"loaded": 0, "saved": 5 if closing else 0, "error": err}}
            if report
            else None
        )
        return {"id": "c", "object": "text_completion", "model": "mv", "kv_transfer_params": rep,
                "choices": [{"index": 0, "text": "", "token_ids": out, "finish_reason": "stop",
                             "stop_reason": None, "logprobs": None}]}  # fmt: skip

    return app


def test_each_ended_path_is_closed_before_the_merged_request(tok):
    log: list[dict] = []
    v = tok.get_vocab()
    with serve_app(plugin_app(tok, log)) as url:
        llm = RemoteLLM(url, tokenizer=str(find_model()), merge="exact")
        assert llm.infos[0].vllm_plugin and llm.merge == "exact"
        probes = len(log)
        out = llm.generate(["Q:"], SamplingParams(max_tokens=64))[0]
    assert out.finish_reason == "stop" and out.usage.blocks == 1, (out.finish_reason, out.error)
    sent = log[probes:]
    closes = [i for i, b in enumerate(sent) if b["prompt"][-2] == v["</Path>"]]
    merged = [i for i, b in enumerate(sent) if v["<Conclusion>"] in b["prompt"]]
    assert len(closes) == 2 and merged and max(closes) < min(merged)
    for i in closes:
        assert sent[i]["max_tokens"] == 1
        assert sent[i]["prompt"].count(v["<Path>"]) == 1  # its own path only: no sibling
    nl = tok.encode("\n", add_special_tokens=False)
    merged_prompt = sent[min(merged)]["prompt"]
    for i in closes:  # the path's whole sequence: its tokens are the merged request's
        seq = sent[i]["prompt"]
        assert seq[-1:] == nl
        path = seq[seq.index(v["<Path>"]) :]
        assert any(merged_prompt[k : k + len(path)] == path for k in range(len(merged_prompt)))


def test_a_connector_error_ends_the_request_with_it(tok):
    log: list[dict] = []
    app = plugin_app(
        tok, log, close_error="path not saved: 9000 tokens > the connector's cap max_tokens=64"
    )
    with serve_app(app) as url:
        out = RemoteLLM(url, tokenizer=str(find_model()), merge="exact").generate(
            ["Q:"], SamplingParams(max_tokens=64)
        )[0]
    assert out.finish_reason == "error" and "cap max_tokens=64" in out.error


def test_the_plugins_server_is_exact_only_and_exact_needs_the_plugin(tok):
    with serve_app(plugin_app(tok, [])) as url:
        out = RemoteLLM(url, tokenizer=str(find_model())).generate(
            ["Q:"], SamplingParams(max_tokens=16)
        )[0]
    assert out.merge == "flat" and out.finish_reason == "error" and "merge='exact'" in out.error
    with serve_app(plugin_app(tok, [], report=False)) as url:
        with pytest.raises(ValueError, match="multiverse_vllm plugin"):
            RemoteLLM(url, tokenizer=str(find_model()), merge="exact")
