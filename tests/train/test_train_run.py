"""End-to-end training runs (multiverse.train.train and ``multiverse train``) on CPU.

* the Trainer's logged loss of a step is the mean NLL of its batch (also with gradient
  accumulation), computed independently;
* a run interrupted at a checkpoint and resumed continues the same loss curve;
* a tiny model memorises Multiverse examples and greedy decoding under the layout rule
  (reference loop with the engine's insertions, and the engine itself) regenerates them;
* the CLI writes a directory that transformers loads, and reports bad input in one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from multiverse.eval import tasks
from multiverse.format import grammar
from multiverse.format import layout as attention
from multiverse.train import data as D
from multiverse.train.trainer import TrainConfig, load_model_and_tokenizer, train


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    tasks.write_jsonl(path, tasks.generate(6, seed=11, tasks=MIX))
    return path


MIX = ("sum_products", "max_total", "vowel_sum", "nested_max", "wide_max")
"""A fixed task list, so the records drawn here stay the same when tasks are added."""


def short_records(n: int, seed: int = 3) -> list[tasks.Record]:
    recs = [r for r in tasks.generate(40, seed=seed, tasks=MIX) if r.task in ("max_total", "sum_products")]
    return sorted(recs, key=lambda r: len(r.chain))[:n]


def batch_nll(model, tokenizer, records) -> float:
    """Mean NLL over the targets of ``records`` (assistant tokens but the path labels, as
    ``tokenize`` labels them; the labels themselves are checked in test_train/test_path_labels),
    one plain forward per record."""
    tags = grammar.tag_ids(tokenizer)
    total, count = 0.0, 0
    for r in records:
        rec = D.Record("x", r.question, r.chain, str(r.answer))
        ids, labels = D.tokenize(tokenizer, D.render(rec, "multiverse"))
        prompt_len = len(D.prompt_ids(tokenizer, r.question))
        targets = [t for t in range(prompt_len, len(ids)) if labels[t] != D.IGNORE_INDEX]
        pos, mask = attention.positions_and_mask(ids, tags)
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([ids]),
                position_ids=pos[None],
                attention_mask=mask[None, None],
            ).logits[0]
        logp = logits.double().log_softmax(-1)
        total += sum(-float(logp[t - 1, ids[t]]) for t in targets)
        count += len(targets)
    return total / count


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        output=str(out),
        config="qwen2-micro",
        lr=1e-3,
        progress=False,
        save_steps=1000,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_logged_loss_is_the_mean_nll_of_the_step(tmp_path, data_file):
    records = tasks.read_jsonl(data_file)[:3]
    small = tmp_path / "three.jsonl"
    tasks.write_jsonl(small, records)
    model, tok = load_model_and_tokenizer(cfg(small, tmp_path / "x"), "sdpa")
    expected = batch_nll(model.eval(), tok, records)
    one_batch = train(cfg(small, tmp_path / "a", max_steps=1, batch_size=3), verbose=False)
    accumulated = train(
        cfg(small, tmp_path / "b", max_steps=1, batch_size=1, grad_accum=3, pack=False),
        verbose=False,
    )
    assert one_batch.losses[0] == pytest.approx(expected, rel=1e-5)
    assert accumulated.losses[0] == pytest.approx(expected, rel=1e-5)


def test_resume_continues_the_same_loss_curve(tmp_path, data_file):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                control.should_training_stop = True

    common = dict(max_steps=6, batch_size=2, save_steps=3, lr=3e-3)
    full = train(cfg(data_file, tmp_path / "full", **common), verbose=False)
    assert len(full.losses) == 6
    cut = tmp_path / "cut"
    first = train(cfg(data_file, cut, **common), callbacks=[StopAt(4)], verbose=False)
    assert first.global_step == 4 and (cut / "checkpoint-3").is_dir()
    resumed = train(cfg(data_file, cut, resume=True, **common), verbose=False)
    assert resumed.global_step == 6
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)  # one curve in the log
    assert first.losses[:4] == pytest.approx(full.losses[:4], rel=1e-6)


def test_resume_without_checkpoint_is_an_error(tmp_path, data_file):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg(data_file, tmp_path / "none", resume=True), verbose=False)


# ----------------------------------------------------------------------------- memorise, regenerate


def greedy_reference(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding, one full forward per token under the layout rule of the growing
    sequence, with the tokens the engine inserts itself (SPEC 4): ``\\n`` after a Goal's
    ``</Goal>``, ``<Path>\\n{label}:`` to start each path (labels from the Outlines), ``\\n``
    after ``</Path>``, ``<Conclusion>\\n`` after the last path. Paths in canonical order."""
    tags = grammar.tag_ids(tokenizer)
    tag_of = {v: k for k, v in tags.items()}
    newline = tokenizer.encode("\n", add_special_tokens=False)
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    state = attention.LayoutState()
    for t in prompt_ids:
        state.step(tag_of.get(t))
    seq, out, pending = list(prompt_ids), [], []
    blocks: list[dict] = []  # open blocks: where their <Parallel> is, labels of paths to come
    while len(out) < max_new_tokens:
        if pending:
            token = pending.pop(0)
        else:
            lay = attention.layout(seq, tags)
            with torch.no_grad():
                logits = model(
                    input_ids=torch.tensor([seq]),
                    position_ids=lay.position_ids[None],
                    attention_mask=lay.dense_mask()[None, None],
                ).logits
            token = int(logits[0, -1].argmax())
        tag, phase = tag_of.get(token), state.phase
        state.step(tag)
        seq.append(token)
        out.append(token)
        if token in stops and not pending:
            break
        if tag == "<Parallel>":
            blocks.append({"start": len(seq) - 1, "labels": None})
        elif tag == "</Goal>" and phase == "goal" and blocks:
            goal = tokenizer.decode(seq[blocks[-1]["start"] :], skip_special_tokens=False)
            labels = grammar.outline_labels(goal)
            blocks[-1]["labels"] = labels[1:]
            pending += newline + tokenizer.encode(f"<Path>\n{labels[0]}:", add_special_tokens=False)
        elif tag == "</Path>" and blocks and blocks[-1]["labels"] is not None:
            labels = blocks[-1]["labels"]
            nxt = f"<Path>\n{labels.pop(0)}:" if labels else "<Conclusion>\n"
            pending += newline + tokenizer.encode(nxt, add_special_tokens=False)
        elif tag == "</Parallel>" and blocks:
            blocks.pop()
    return out


def memorise_and_regenerate(tmp_path, records, preset: str, steps: int, lr: float) -> None:
    from transformers import AutoModelForCausalLM

    path = tmp_path / "mem.jsonl"
    tasks.write_jsonl(path, records)
    out = tmp_path / "model"
    result = train(
        cfg(
            path,
            out,
            config=preset,
            max_steps=steps,
            lr=lr,
            batch_size=len(records),
            warmup_ratio=0.0,
            weight_decay=0.0,
        ),
        verbose=False,
    )
    assert result.losses[-1] < 0.1 * result.losses[0]
    from multiverse.format.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    targets, prompts = [], []
    for r in records:
        rec = D.Record("x", r.question, r.chain, str(r.answer))
        ids, _ = D.tokenize(tok, D.render(rec, "multiverse"))
        prompt = D.prompt_ids(tok, r.question)
        assert ids[: len(prompt)] == prompt
        target = ids[len(prompt) :]
        targets.append(target[: target.index(im_end) + 1])  # up to the end of the turn
        prompts.append(prompt)
    for prompt, target in zip(prompts, targets, strict=True):
        got = greedy_reference(model, tok, prompt, len(target) + 4)
        assert tok.decode(got) == tok.decode(target)
        assert got == target
    from multiverse import LLM, SamplingParams

    llm = LLM(str(out), device="cpu", dtype="float32")
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max(map(len, targets)) + 4,
        parallel=True,
        stop_token_ids=[im_end],
    )
    outputs = llm.generate(prompts, params)
    for o, target in zip(outputs, targets, strict=True):
        got = list(o.token_ids)
        got = got[:-1] if got and got[-1] == im_end else got  # the stop token may be left out
        assert got == target[:-1]


def test_tiny_model_memorises_and_regenerates(tmp_path):
    memorise_and_regenerate(tmp_path, short_records(2), "qwen2-micro", steps=250, lr=4e-3)


@pytest.mark.slow
def test_small_model_memorises_nested_examples(tmp_path):
    records = (
        short_records(3) + [r for r in tasks.generate(40, seed=5, tasks=MIX) if r.task == "nested_max"][:1]
    )
    memorise_and_regenerate(tmp_path, records, "qwen2-tiny", steps=300, lr=2e-3)


# ----------------------------------------------------------------------------- CLI and output


def test_cli_trains_and_writes_a_loadable_model(tmp_path, data_file, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from multiverse.cli import main

    out = tmp_path / "cli"
    rc = main(
        ["train", "--config", "qwen2-micro", "--data", str(data_file), "--output", str(out),
         "--max-steps", "2", "--batch-size", "2", "--no-progress", "--curriculum", "--epochs", "2"]
    )  # fmt: skip
    assert rc == 0
    assert "trained 2 steps" in capsys.readouterr().out
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2]
    summary = json.loads((out / "train_summary.json").read_text())
    # 2 passes over 6 records = 12 examples in 8 segments of sizes 1,2,1,2,1,2,1,2; MV per
    # segment = floor(size * share) with shares 0,0,.1,.5,.5,.9,1,1 -> 0,0,0,1,0,1,1,2
    assert summary["data"]["forms"] == {"multiverse": 5, "sequential": 7}
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert grammar.tag_ids(tok)["</Path>"] < model.get_input_embeddings().weight.shape[0]


def test_cli_reports_bad_input_in_one_line(tmp_path, data_file, capsys):
    from multiverse.cli import main

    rc = main(
        [
            "train",
            "--config",
            "qwen2-micro",
            "--data",
            str(tmp_path / "missing.jsonl"),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "training data not found" in err and "Traceback" not in err
    rc = main(["train", "--config", "qwen2-micro", "--data", str(data_file), "--output", str(tmp_path / "o"),
               "--mode", "autoregressive", "--curriculum"])  # fmt: skip
    assert rc == 2 and "--curriculum" in capsys.readouterr().err


def test_model_without_tags_gets_them(tmp_path, data_file):
    """A pretrained directory whose tokenizer lacks the tags: they are added (special tokens,
    embeddings resized to a multiple of 64) and saved with the trained model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from multiverse.train.bpe import CHAT_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = [json.dumps(r.to_dict()) for r in tasks.read_jsonl(data_file)]
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    assert "<Path>" not in tok.get_vocab()
    base = tmp_path / "base"
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path / "out"
    train(cfg(data_file, out, config=None, model=str(base), max_steps=1), verbose=False)
    saved = AutoTokenizer.from_pretrained(str(out))
    ids = grammar.tag_ids(saved)
    assert sorted(ids.values()) == list(range(len(tok), len(tok) + 12))
    rows = AutoModelForCausalLM.from_pretrained(str(out)).get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tok) + 12
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [saved.convert_tokens_to_ids("<|im_end|>"), saved.eos_token_id]


# ----------------------------------------------------------------------------- warm-up, output


def expected_lr(lr: float, warmup: int, total: int) -> list[float]:
    """The cosine schedule's learning rate of each step 1..total (logged after it ran): linear
    from 0 over ``warmup`` steps, then half a cosine down to 0."""
    out = []
    for s in range(total):  # the scheduler's step index of optimizer step s + 1
        if s < warmup:
            out.append(lr * s / warmup)
        else:
            out.append(lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    return out


@pytest.mark.parametrize(
    ("ratio", "run", "total", "warmup"),
    [
        (1.0, dict(max_steps=4), 4, 4),  # the whole run warms up (not a 1-step warm-up)
        (0.5, dict(epochs=2), 6, 3),  # 6 records, batch 2, 2 epochs: ceil(0.5 * 6) steps
        (0.0, dict(max_steps=4), 4, 0),
    ],
)
def test_warmup_ratio_is_a_share_of_the_steps(tmp_path, data_file, ratio, run, total, warmup):
    result = train(
        cfg(data_file, tmp_path / "w", batch_size=2, warmup_ratio=ratio, lr=1e-3, **run),
        verbose=False,
    )
    lrs = [e["learning_rate"] for e in result.log if "loss" in e]
    assert result.global_step == total
    assert lrs == pytest.approx(expected_lr(1e-3, warmup, total), abs=1e-12)


def test_warmup_steps_and_bad_ratios(tmp_path):
    from multiverse.train.arguments import warmup_steps
    from multiverse.train.data import ConfigError

    assert [warmup_steps(0.05, 1300), warmup_steps(0.07, 100), warmup_steps(1.0, 8)] == [65, 7, 8]
    assert [warmup_steps(0.0, 10), warmup_steps(0.01, 10), warmup_steps(0.5, 0)] == [0, 1, 0]
    for bad in (-0.1, 1.5, 3.0):
        with pytest.raises(ConfigError, match=r"warmup_ratio .* \[0, 1\]"):
            cfg("d.jsonl", tmp_path, warmup_ratio=bad)


def test_output_records_the_tasks_trained_on(tmp_path):
    from multiverse.train.summary import read_training_record

    path = tmp_path / "d.jsonl"
    recs = tasks.generate(3, seed=2, tasks=["countdown_warmup"]) + tasks.generate(2, seed=2, tasks=["max_total"])
    tasks.write_jsonl(path, recs)
    out = tmp_path / "model"
    train(cfg(path, out, max_steps=1, batch_size=1, mode="autoregressive"), verbose=False)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["tasks"] == ["countdown_warmup", "max_total"]
    assert summary["task_records"] == {"countdown_warmup": 3, "max_total": 2}
    assert (summary["records"], summary["mode"], summary["global_step"]) == (5, "autoregressive", 1)
    record = read_training_record(out)
    assert record is not None and record.path == out / "train_summary.json"
    assert (record.tasks, record.records, record.mode) == (("countdown_warmup", "max_total"), 5, "autoregressive")
    assert read_training_record(tmp_path) is None  # a directory without the file records nothing
    (tmp_path / "train_summary.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"train_summary.json: not valid JSON"):
        read_training_record(tmp_path)


def test_non_empty_output_needs_overwrite_or_resume(tmp_path, data_file, capsys):
    from multiverse.cli import main

    def run(output, steps: int, save_steps: int, *extra: str) -> int:
        return main(["train", "--config", "qwen2-micro", "--data", str(data_file), "--output", str(output),
                     "--max-steps", str(steps), "--save-steps", str(save_steps), "--no-progress", *extra])  # fmt: skip

    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    assert run(out, 1, 1) == 0
    assert (out / "checkpoint-1").is_dir()
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run(out, 2, 1) == 2
    err = capsys.readouterr().err
    assert f"--output {out} is not empty" in err and "--overwrite" in err and "--resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    assert run(out, 2, 1, "--overwrite", "--resume") == 2
    assert "give one of them" in capsys.readouterr().err
    # --overwrite: the earlier run's checkpoints and log go, the new run is the only one there
    assert run(out, 2, 1000, "--overwrite") == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert not (out / "checkpoint-1").exists() and (out / "checkpoint-2").is_dir()
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2]
    (tmp_path / "file").write_text("x")
    assert run(tmp_path / "file", 1, 1) == 2
    assert "not a directory" in capsys.readouterr().err
