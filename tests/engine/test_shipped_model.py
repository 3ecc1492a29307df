"""The shipped tiny models (``models/multiverse-tiny``, ``models/autoregressive-tiny``).

Central check (SPEC 3): every token the engine sampled greedily with forking on is the argmax
of ONE full-sequence transformers forward over prompt + output, with the positions and the
mask of the layout rule (:func:`multiverse.format.layout.layout`); tokens the engine inserted
itself (``out.forced``) are not sampled and are excluded. The engine's own positions must equal
the layout rule's. Held-out problems of the shipped models' task are used (5-6 paths each).

Skipped cleanly when the model directories are absent (e.g. a checkout without them).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from _engine_util import check_greedy

from multiverse.eval.evaluate import DEFAULT_MAX_TOKENS
from multiverse.format import grammar

REPO = Path(__file__).resolve().parents[2]
MV_DIR = REPO / "models" / "multiverse-tiny"
AR_DIR = REPO / "models" / "autoregressive-tiny"
MAX_TOKENS = DEFAULT_MAX_TOKENS
TIE_GAP = 1e-4  # a differing argmax is accepted only as a float-rounding tie

pytestmark = pytest.mark.skipif(
    not (MV_DIR / "config.json").is_file() or not (AR_DIR / "config.json").is_file(),
    reason="shipped models not present (models/multiverse-tiny, models/autoregressive-tiny)",
)


def _problems():
    from multiverse.cli.demo_model import demo_problems
    from multiverse.eval.datasets import synthetic_tasks_for

    choice = synthetic_tasks_for(MV_DIR)  # the tasks the models learned (their record)
    return demo_problems(4, choice.tasks)


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def _generate(model_dir: Path, parallel: bool):
    from multiverse import LLM, SamplingParams
    from multiverse.format.prompts import chat_prompt, stop_token_ids

    llm = LLM(str(model_dir), device="cpu", dtype="float32")
    tok = llm.tokenizer
    prompts = [chat_prompt(tok, r.question, parallel=parallel) for r in _problems()]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        parallel=parallel,
        stop_token_ids=stop_token_ids(tok),
    )
    return tok, llm.generate(prompts, params)


@pytest.fixture(scope="module")
def mv_outputs():
    return _generate(MV_DIR, parallel=True)


def test_multiverse_greedy_tokens_are_full_forward_argmax(mv_outputs):
    tok, outs = mv_outputs
    model = _hf(MV_DIR)
    total_forced = 0
    for out in outs:
        assert out.usage.blocks >= 1, f"no fork happened: {out.text[:300]!r}"
        assert check_greedy(model, tok, out, TIE_GAP) > 50
        total_forced += sum(out.forced)
    assert total_forced > 0  # forced tokens exist and were excluded
    assert min(out.text.count("<Path>") for out in outs) >= 5  # countdown: 5-6 paths each


def test_multiverse_outputs_are_valid_and_correct(mv_outputs):
    from multiverse.eval.grading import grade

    _, outs = mv_outputs
    for rec, out in zip(_problems(), outs, strict=True):
        assert out.finish_reason != "length", f"{rec.id}: hit the token budget"
        assert grammar.validate(out.text.split("</Think>")[0] + "</Think>") == []
        assert grade(out.text, str(rec.answer), kind="exact"), (
            f"{rec.id}: expected {rec.answer}, got {out.text[-60:]!r}"
        )
        assert out.usage.parallel_degree > 1.0


def test_autoregressive_twin_is_sequential_and_consistent():
    from multiverse.eval.grading import grade

    tok, outs = _generate(AR_DIR, parallel=False)
    model = _hf(AR_DIR)
    for rec, out in zip(_problems(), outs, strict=True):
        assert "<Parallel>" not in out.text
        assert out.usage.parallel_degree == pytest.approx(1.0)
        assert check_greedy(model, tok, out, TIE_GAP) > 30
        assert grade(out.text, str(rec.answer), kind="exact"), rec.id


@pytest.mark.parametrize("model_dir", [MV_DIR, AR_DIR], ids=["multiverse", "autoregressive"])
def test_model_dir_contents(model_dir: Path):
    gen = json.loads((model_dir / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert {ids["<|im_end|>"], ids["<|endoftext|>"]} <= set(eos)
    summary = json.loads((model_dir / "train_log_summary.json").read_text())
    assert summary["global_step"] == summary["config"]["max_steps"]
    assert (model_dir / "README.md").is_file()


def test_twins_were_trained_alike_on_cpu_within_an_hour():
    """Issue 5: same data and budget (only the mode differs), trained on CPU, <= 60 min each."""
    mv, ar = (json.loads((d / "train_log_summary.json").read_text()) for d in (MV_DIR, AR_DIR))
    same = {k: v for k, v in mv["config"].items() if k not in ("mode", "output")}
    assert same == {k: v for k, v in ar["config"].items() if k not in ("mode", "output")}
    assert (mv["mode"], ar["mode"]) == ("multiverse", "autoregressive")
    assert mv["data"]["records"] == ar["data"]["records"] and not mv["data"]["skipped"]
    for summary in (mv, ar):
        assert summary["config"]["device"] == "cpu" and 0 < summary["wall_s"] <= 3600


def test_shipped_weights_fit_the_size_limit():
    size = sum(p.stat().st_size for d in (MV_DIR, AR_DIR) for p in d.glob("*.safetensors"))
    assert 0 < size <= 25 * 1024 * 1024


def test_demo_runs_on_the_shipped_model():
    from multiverse.cli.demo_model import run_model_demo

    buf = io.StringIO()
    assert run_model_demo(MV_DIR, 1, out=buf) == 0
    text = buf.getvalue()
    assert "Parallel:" in text and "Path 1" in text
    assert "speedup" in text and "1/1 correct" in text
    assert "autoregressive twin" in text  # the twin next to the model is compared
