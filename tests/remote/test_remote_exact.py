"""The driver against a real ``multiverse serve`` (shipped tiny model): the ``exact`` merge gives
``LLM.generate``'s output token for token (greedy) on held-out problems that fork; ``flat`` is
named and keeps the map and the paths exact; the sub-requests carry exactly the tokens the engine
inserts; replicas keep a request's sub-requests together; the server advertises what the driver
needs."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import API_KEY, tiny_problems

from multiverse.engine.sampling import SamplingParams, branch_seed
from multiverse.format.prompts import chat_prompt, stop_token_ids
from multiverse.format.tokenizer import tag_ids
from multiverse.remote import RemoteLLM

N = 3


class Recording(httpx.AsyncBaseTransport):
    """A real transport that remembers every completions request (host, JSON body)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.calls: list[tuple[str, dict]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions"):
            self.calls.append((request.url.host, json.loads(request.content)))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _params(tok, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=1024, logprobs=True, stop_token_ids=stop_token_ids(tok), **kw
    )


@pytest.fixture(scope="module")
def reference(tiny_local):
    tok = tiny_local.tokenizer
    prompts = [chat_prompt(tok, q) for q in tiny_problems(N)]
    outs = tiny_local.generate(prompts, _params(tok))
    assert all(o.usage.blocks >= 1 for o in outs), "the held-out problems must fork"
    return prompts, outs


def _same(local, remote) -> None:
    assert remote.token_ids == local.token_ids, (local.text[-200:], remote.text[-200:])
    assert remote.text == local.text and remote.finish_reason == local.finish_reason
    assert remote.forced == local.forced and remote.position_ids == local.position_ids
    assert remote.tree == local.tree
    for f in (
        "prompt_tokens",
        "completion_tokens",
        "depth_tokens",
        "forced_tokens",
        "blocks",
        "branches",
    ):
        assert getattr(remote.usage, f) == getattr(local.usage, f), f
    assert remote.usage.parallel_degree == pytest.approx(local.usage.parallel_degree)
    assert [lp is None for lp in remote.logprobs] == [lp is None for lp in local.logprobs]
    diffs = [
        abs(a - b) for a, b in zip(local.logprobs, remote.logprobs, strict=True) if a is not None
    ]
    assert max(diffs) < 1e-4


def test_server_advertises_what_the_driver_needs(tiny_server):
    url, _, llm = tiny_server
    listing = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    mv = listing["data"][0]["multiverse"]
    assert mv["merge_modes"] == ["exact", "flat"] and mv["tag_ids"] == tag_ids(llm.tokenizer)
    assert set(stop_token_ids(llm.tokenizer)) <= set(mv["eos_token_ids"])
    assert httpx.get(f"{url}{mv['tokenizer']}").status_code == 401  # behind the key like the rest
    files = httpx.get(
        f"{url}{mv['tokenizer']}", headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()["files"]
    assert "tokenizer.json" in files


def test_exact_merge_equals_the_local_engine(reference, tiny_server):
    prompts, local = reference
    driver = RemoteLLM(
        tiny_server[0], api_key=API_KEY
    )  # no other argument: the server says the rest
    assert driver.merge == "exact"
    outs = driver.generate(prompts, _params(driver.tokenizer))
    for lo, ro in zip(local, outs, strict=True):
        _same(lo, ro)
        assert ro.merge == "exact" and ro.http_requests >= 2 + ro.usage.branches
        assert (
            ro.prefix_cache_hit_rate is not None and ro.prefix_cache_hit_rate > 0
        )  # the server's /metrics
    print(
        f"multiverse serve prefix-cache hit rate over the driver's requests: {outs[0].prefix_cache_hit_rate:.3f}"
    )
    for tree in driver.trees:
        tree.check_invariants()


def test_sub_requests_carry_the_engines_tokens(reference, tiny_server):
    prompts, local = reference
    rec = Recording()
    driver = RemoteLLM(tiny_server[0], api_key=API_KEY, transport=rec)
    out = driver.generate(prompts[0], _params(driver.tokenizer))[0]
    _same(local[0], out)
    assert out.http_requests == len(rec.calls)
    bodies = [b for _, b in rec.calls]
    tags, sp = driver.tag_ids, driver.specials
    prompt_ids = driver.tokenizer.encode(prompts[0], add_special_tokens=False)
    assert bodies[0]["prompt"] == prompt_ids
    for b in bodies:
        assert {tags["</Goal>"], tags["</Path>"]} <= set(b["stop_token_ids"])
        assert b["return_token_ids"] and b["skip_special_tokens"] is False and b["parallel"] is True
    block = out.tree["blocks"][0]
    fork_at = len(prompt_ids) + block["start"]  # the Map's context ends with "</Goal>\n"
    paths = [b for b in bodies if len(b["prompt"]) > fork_at and b["prompt"][fork_at] == tags["<Path>"]
             and tags["<Conclusion>"] not in b["prompt"]]  # fmt: skip
    assert len(paths) == len(block["paths"])
    for body, path in zip(paths, block["paths"], strict=True):
        start = sp.path_start(path["label"])  # the engine's inserted tokens, one source
        assert body["prompt"] == prompt_ids + out.token_ids[: block["start"]] + start
        assert body["prompt"][fork_at - 1 - len(sp.newline) + 1 : fork_at] == sp.newline
    reduce_ = [b for b in bodies if tags["<Conclusion>"] in b["prompt"]][0]
    end = block["end"] + len(sp.conclusion)
    assert (
        reduce_["prompt"] == prompt_ids + out.token_ids[:end]
    )  # paths in outline order + "<Conclusion>\n"


def _counting(llm) -> list[int]:
    """Count the tokens ``llm``'s steps compute (the server's engine thread calls its runner)."""
    count, run = [0], llm.runner.run

    def spy(works):
        count[0] += sum(w.count for w in works)
        return run(works)

    llm.runner.run = spy
    return count


def test_the_server_computes_the_local_engines_tokens_but_concurrent_path_starts(
    reference, tiny_server, tiny_local
):
    # every request hits the cached K/V of the ones before it: the path requests the Map's, the
    # Reduce every path's (multiverse.engine.reuse); old code: the Reduce re-prefilled paths 2..n
    prompts, local = reference
    driver, server = RemoteLLM(tiny_server[0], api_key=API_KEY), tiny_server[2]
    counts = []
    for prompt, lo in zip(prompts, local, strict=True):
        for llm, engine in ((tiny_local, tiny_local), (server, driver)):
            llm.radix.clear()  # each way starts cold
            run = llm.runner.run
            n = _counting(llm)
            try:
                out = engine.generate(prompt, _params(tiny_local.tokenizer))[0]
            finally:
                llm.runner.run = run
            _same(lo, out)
            counts.append(n[0])
    print(f"tokens computed, local engine vs the server (exact): {counts[0::2]} vs {counts[1::2]}")
    # path requests that reach the engine in one step each compute the context's uncached end
    # ("</Goal>\n<Path>\n", which path 1's request caches only once computed): at most that
    # much more per path after the first of a block (the Reduce recomputes "<Path>\n" of those)
    shared = len(driver.tokenizer.encode("</Goal>\n<Path>\n", add_special_tokens=False))
    for lo, n_local, n_server in zip(local, counts[0::2], counts[1::2], strict=True):
        assert n_server <= n_local + (lo.usage.branches - lo.usage.blocks) * shared


def test_flat_merge_is_named_and_keeps_the_map_and_paths_exact(reference, tiny_server):
    prompts, local = reference
    driver = RemoteLLM(tiny_server[0], api_key=API_KEY, merge="flat")
    outs = driver.generate(prompts, _params(driver.tokenizer))
    same = 0
    for lo, ro in zip(local, outs, strict=True):
        assert ro.merge == "flat"
        end = lo.tree["blocks"][0]["end"]
        assert ro.token_ids[:end] == lo.token_ids[:end]  # prefix + every path of the first block
        same += ro.token_ids == lo.token_ids
    print(f"flat merge: {same}/{len(outs)} outputs token-identical to the local engine")


def test_sampled_paths_get_the_engines_seeds(tiny_server):
    rec = Recording()
    driver = RemoteLLM(tiny_server[0], api_key=API_KEY, transport=rec)
    tok = driver.tokenizer
    sp = SamplingParams(
        temperature=0.7, seed=7, max_tokens=1024, stop_token_ids=stop_token_ids(tok)
    )
    prompt = chat_prompt(tok, tiny_problems(1)[0])
    first = driver.generate(prompt, sp)[0]
    again = driver.generate(prompt, sp)[0]
    assert first.token_ids == again.token_ids  # seeded: reproducible
    tags = driver.tag_ids
    for _, body in rec.calls[: first.http_requests]:
        ids = body["prompt"]
        if tags["<Path>"] in ids and tags["<Conclusion>"] not in ids and ids[-1] != tags["</Path>"]:
            label = (
                tok.decode(ids[len(ids) - 1 - ids[::-1].index(tags["<Path>"]) + 1 :])
                .strip()
                .rstrip(":")
            )
            if body["seed"] == branch_seed(7, (label,)):
                break
    else:
        pytest.fail("no path request carried the engine's per-path seed")


def test_replicas_keep_a_request_on_one_server(reference, tiny_server):
    prompts, local = reference
    url = tiny_server[0]
    other = url.replace("127.0.0.1", "localhost")  # a second name: the driver sees two replicas
    rec = Recording()
    driver = RemoteLLM([url, other], api_key=API_KEY, transport=rec)
    outs = driver.generate(prompts, _params(driver.tokenizer))
    for lo, ro in zip(local, outs, strict=True):
        _same(lo, ro)
    assert {o.base_url for o in outs} == {url, other}
    for o, p in zip(outs, prompts, strict=True):
        ids = driver.tokenizer.encode(p, add_special_tokens=False)
        hosts = {h for h, b in rec.calls if b["prompt"][: len(ids)] == ids}
        assert hosts == {httpx.URL(o.base_url).host}


def test_return_token_ids_keeps_the_stop_token_as_vllm_does(tiny_server):
    url, _, llm = tiny_server
    tok = llm.tokenizer
    goal = tag_ids(tok)["</Goal>"]
    prompt = tok.encode(chat_prompt(tok, tiny_problems(1)[0]), add_special_tokens=False)
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 400, "stop_token_ids": [goal],
            "return_token_ids": True, "logprobs": 1}  # fmt: skip
    choice = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                        timeout=60).json()["choices"][0]  # fmt: skip
    assert (
        choice["token_ids"][-1] == goal
        and choice["stop_reason"] == goal
        and choice["finish_reason"] == "stop"
    )
    assert len(choice["logprobs"]["token_logprobs"]) == len(choice["token_ids"])
    assert choice["logprobs"]["token_logprobs"][-1] is not None  # the stop token's own logprob
    assert "</Goal>" not in choice["text"]  # the text leaves it out
    plain = httpx.post(f"{url}/v1/completions", json={**body, "return_token_ids": False},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).json()["choices"][0]  # fmt: skip
    assert (
        "token_ids" not in plain
        and len(plain["logprobs"]["token_logprobs"]) == len(choice["token_ids"]) - 1
    )


def test_stop_strings_end_paths_as_the_engine_does(tiny_local, tiny_server):
    """A stop string met inside paths 1 and 3 (" 50 47") ends those paths, cut as the engine
    cuts them; the driver applies the engine's rule to the server's tokens."""
    tok = tiny_local.tokenizer
    prompt = chat_prompt(tok, tiny_problems(1)[0])
    sp = _params(tok, stop=[" 50 47"])
    local = tiny_local.generate(prompt, sp)[0]
    assert local.usage.blocks >= 1 and " 50 47" not in local.text
    remote = RemoteLLM(tiny_server[0], api_key=API_KEY).generate(prompt, sp)[0]
    _same(local, remote)
