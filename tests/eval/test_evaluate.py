"""Tests for ``multiverse eval`` (multiverse.eval.evaluate) and the benchmark loaders.

Most tests drive :func:`multiverse.eval.evaluate.evaluate` with ``ScriptedLLM``, a STAND-IN for the
engine (not a model): it returns scripted outputs and advances a fake clock by one second per
decoding step, so speedups are computed by hand. One test runs the real engine on a tiny random
model and checks only the structure of the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from multiverse.cli import evaluation
from multiverse.eval import datasets as benchmarks_data
from multiverse.eval import evaluate
from multiverse.eval.datasets import Problem, load_benchmark
from multiverse.format.prompts import chat_prompt, user_prompt
from multiverse.train.bpe import default_tokenizer

BLOCK = (
    "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n"
    "<Outline>\n2: b\n</Outline>\n</Goal>\n<Path>\n1: a\n</Path>\n<Path>\n2: b\n</Path>\n"
    "<Conclusion>\nc\n</Conclusion>\n</Parallel>\n</Think>\n\nAnswer: {}"
)
PLAIN = "<Think>\nno blocks here\n</Think>\n\nAnswer: {}"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Usage:
    parallel_degree: float
    depth_tokens: int
    completion_tokens: int


@dataclass
class Output:
    text: str
    usage: Usage
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Params:
    temperature: float
    max_tokens: int
    parallel: bool
    stop_token_ids: list[int] = field(default_factory=list)
    serial_branches: bool = False


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class ScriptedLLM:
    """Stand-in for multiverse.LLM: scripted outputs keyed by question; a batch takes as many
    fake seconds as its longest member has decoding steps (depth when forking, all tokens
    when not)."""

    def __init__(self, clock: FakeClock, script: dict[str, tuple[Output, Output]]):
        self.clock = clock
        self.script = script
        self.calls: list[tuple[list[str], Params]] = []
        self.tokenizer = default_tokenizer()

    def generate(self, prompts: list[str], params: Params) -> list[Output]:
        self.calls.append((list(prompts), params))
        outs = []
        for prompt in prompts:
            key = next(q for q in self.script if q in prompt)
            outs.append(self.script[key][0 if params.parallel else 1])
        forking = params.parallel and not params.serial_branches  # serial: same text, one token a step
        steps = max(o.usage.depth_tokens if forking else o.usage.completion_tokens for o in outs)
        self.clock.t += steps
        return outs


def _out(text: str, total: int, depth: int) -> Output:
    return Output(text, Usage(round(total / depth, 4), depth, total))


PROBLEMS = [
    Problem("p1", "What is one?", "1", "exact"),
    Problem("p2", "What is two?", "2", "exact"),
    Problem("p3", "What is three?", "3", "exact"),
]
SCRIPT = {
    "What is one?": (_out(BLOCK.format(1), 24, 20), _out(PLAIN.format(1), 24, 24)),
    "What is two?": (_out(PLAIN.format(5), 10, 10), _out(PLAIN.format(5), 10, 10)),
    "What is three?": (_out(BLOCK.format(3), 30, 20), _out(PLAIN.format(4), 30, 30)),
}


def _run(batch_size: int, **kw):
    clock = FakeClock()
    llm = ScriptedLLM(clock, SCRIPT)
    res = evaluate.evaluate(
        llm, llm.tokenizer, PROBLEMS, benchmark="toy", model="scripted", batch_size=batch_size,
        max_tokens=64, params=Params, clock=clock, **{"baseline": "plain", **kw},
    )  # fmt: skip
    return res, llm


def test_serial_baseline_times_the_same_output_sequentially():
    res, llm = _run(1, baseline="serial")
    s = res.summary()
    assert s["accuracy_sequential"] == s["accuracy"] == round(2 / 3, 4)  # the same texts
    assert s["time_parallel_s"] == 50 and s["time_sequential_s"] == 64  # depths vs tokens
    off = [p for _, p in llm.calls[2:] if p.serial_branches]
    assert len(off) == 3 and all(p.parallel for p in off)
    with pytest.raises(ValueError, match="baseline"):
        _run(1, baseline="nope")


def test_metrics_batch_1_by_hand():
    res, llm = _run(1)
    s = res.summary()
    assert s["n"] == 3
    assert s["accuracy"] == round(2 / 3, 4)
    assert s["accuracy_sequential"] == round(1 / 3, 4)
    assert s["trigger_rate"] == round(2 / 3, 4)
    assert s["parallel_degree"] == round((1.2 + 1.0 + 1.5) / 3, 4)
    assert s["parallel_degree_triggered"] == round((1.2 + 1.5) / 2, 4)
    assert s["time_parallel_s"] == 50  # depths 20 + 10 + 20
    assert s["time_sequential_s"] == 64  # tokens 24 + 10 + 30
    assert s["speedup"] == round(64 / 50, 4)
    assert [x.speedup for x in res.samples] == [1.2, 1.0, 1.5]
    assert [x.extracted for x in res.samples] == ["1", "5", "3"]
    assert [x.blocks for x in res.samples] == [1, 0, 1]
    assert s["completion_tokens"] == 64 and s["depth_tokens"] == 50
    # warm-up (one call per mode) + 3 batches x 2 modes; greedy; both modes present
    assert len(llm.calls) == 2 + 6
    assert all(p.temperature == 0.0 for _, p in llm.calls)
    assert [p.parallel for _, p in llm.calls[2:]] == [True, False, False, True, True, False]
    assert all(p.max_tokens == 64 for _, p in llm.calls[2:])
    # no stop ids of its own: the backend ends an answer at EOS and the chat turn end (policy.end_ids)
    assert all(p.stop_token_ids == [] for _, p in llm.calls)


def test_by_task_metrics_by_hand():
    tagged = [
        Problem(p.id, p.question, p.answer, p.kind, {"task": t, "structure": st})
        for p, (t, st) in zip(PROBLEMS, [("a", "parallel"), ("b", "sequential"), ("a", "parallel")])
    ]
    clock = FakeClock()
    llm = ScriptedLLM(clock, SCRIPT)
    res = evaluate.evaluate(llm, llm.tokenizer, tagged, benchmark="toy", batch_size=1, max_tokens=64,
                            params=Params, clock=clock, baseline="plain")  # fmt: skip
    by = res.summary()["by_task"]
    assert list(by) == ["a", "b"]
    # a: p1 (on right, off right; depth 20 vs 24 tokens) and p3 (on right, off wrong; 20 vs 30)
    assert by["a"] == {"n": 2, "accuracy": 1.0, "accuracy_sequential": 0.5, "parallel_degree": 1.35,
                       "trigger_rate": 1.0, "speedup": round(54 / 40, 4)}  # fmt: skip
    assert by["b"] == {"n": 1, "accuracy": 0.0, "accuracy_sequential": 0.0, "parallel_degree": 1.0,
                       "trigger_rate": 0.0, "speedup": 1.0}  # fmt: skip
    rows = res.to_dict()["samples"]
    assert [(r["task"], r["structure"]) for r in rows] == [("a", "parallel"), ("b", "sequential"), ("a", "parallel")]
    md = evaluate.format_markdown(res)
    assert "| task | n |" in md and "| a | 2 | 100.0% | 50.0% | 1.350 | 100.0% | 1.350 |" in md
    one = evaluate.EvalResult("toy", "m", 1, 64, "parallel", samples=res.samples[:1])
    assert list(one.summary()["by_task"]) == ["a"] and "| task |" not in evaluate.format_markdown(one)
    untimed = evaluate.evaluate(llm, llm.tokenizer, tagged, batch_size=1, max_tokens=64, params=Params,
                                clock=clock, speedup=False)  # fmt: skip
    assert untimed.summary()["by_task"]["a"]["speedup"] is None
    plain, _ = _run(1)  # problems without a task: no by_task, samples say None
    assert "by_task" not in plain.summary() and plain.samples[0].task is None
    assert "| task |" not in evaluate.format_markdown(plain)


def test_synthetic_problems_carry_task_and_structure(tmp_path):
    from multiverse.eval.datasets import synthetic_tasks_for

    probs = load_benchmark("synthetic", 20, tasks=["word_parallel", "word_sequential"])
    pairs = {(p.meta["task"], p.meta["structure"]) for p in probs}
    assert pairs == {("word_parallel", "parallel"), ("word_sequential", "sequential")}
    assert all(p.kind == "exact" for p in probs)
    assert {p.meta["structure"] for p in load_benchmark("synthetic", 10)} == {"parallel"}
    # the word problems are not in the default mix, but a model trained on them is asked them
    choice = synthetic_tasks_for(_record(tmp_path / "w", ["word_parallel", "word_sequential"]))
    assert choice.tasks == ("word_parallel", "word_sequential") and choice.recorded


def test_same_prompts_and_batches_in_both_modes():
    res, llm = _run(2)
    timed = llm.calls[2:]
    on = [prompts for prompts, p in timed if p.parallel]
    off = [prompts for prompts, p in timed if not p.parallel]
    assert on == off and [len(b) for b in on] == [2, 1]
    s = res.summary()
    assert s["time_parallel_s"] == 20 + 20  # max(20, 10) + 20
    assert s["time_sequential_s"] == 24 + 30  # max(24, 10) + 30
    assert s["speedup"] == round(54 / 40, 4)
    assert [x.batch for x in res.samples] == [0, 0, 1]
    assert evaluate.batch_points(res) == [((1.2 + 1.0) / 2, round(24 / 20, 4)), (1.5, 1.5)]


def test_no_speedup_pass():
    res, llm = _run(1, speedup=False, warmup=False)
    assert all(p.parallel for _, p in llm.calls) and len(llm.calls) == 3
    s = res.summary()
    assert s["speedup"] is None and s["time_sequential_s"] is None
    assert s["accuracy_sequential"] is None
    assert evaluate.batch_points(res) == []


def test_prompts_follow_spec():
    tok = default_tokenizer()
    res, llm = _run(1, warmup=False)
    first_prompt = llm.calls[0][0][0]
    assert first_prompt == chat_prompt(tok, "What is one?")
    assert first_prompt.endswith(
        "<|im_start|>user\nWhat is one? Think step by step and in parallel before answering."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert user_prompt("Q?", parallel=False) == "Q? Think step by step before answering."
    gpqa = "Answer the following. Think step by step before answering.\n\nWhat?\nA) 1\nB) 2"
    assert user_prompt(gpqa).count("Think step by step") == 1
    assert "Think step by step and in parallel before answering." in user_prompt(gpqa)

    class NoTemplate:
        chat_template = None

    assert (
        chat_prompt(NoTemplate(), "Q?")
        == "Q? Think step by step and in parallel before answering.\n"
    )


def test_write_outputs(tmp_path):
    res, _ = _run(1)
    paths = evaluation.write_outputs(res, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    for key in ("n", "accuracy", "parallel_degree", "trigger_rate", "speedup", "samples"):
        assert key in data
    assert data["samples"][0]["id"] == "p1" and data["samples"][0]["correct"] is True
    md = paths["md"].read_text()
    assert "| toy | 3 | 66.7% | 33.3% | 1.233 | 66.7% | 1.280 |" in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        _run(0)

    class Short(ScriptedLLM):
        def generate(self, prompts, params):
            return super().generate(prompts, params)[:-1]

    clock = FakeClock()
    with pytest.raises(RuntimeError, match="2 prompts"):
        evaluate.evaluate(Short(clock, SCRIPT), default_tokenizer(), PROBLEMS[:2], batch_size=2,
                          params=Params, clock=clock, warmup=False)  # fmt: skip


# ----------------------------------------------------------------------------- loaders


def test_load_benchmarks(shared_data):
    data = shared_data / "benchmarks"
    for name, n, kind in [("aime24", 30, "math"), ("aime25", 30, "math"), ("math500", 500, "math"),
                          ("gpqa", 198, "choice")]:  # fmt: skip
        probs = load_benchmark(name, data_dir=data)
        assert len(probs) == n and {p.kind for p in probs} == {kind}
        assert len({p.id for p in probs}) == n
    assert load_benchmark("aime24", data_dir=data)[0].answer == "204"
    assert load_benchmark("gpqa", limit=3, data_dir=data)[0].answer == "C"
    assert len(load_benchmark("math500", limit=7, data_dir=data)) == 7


def test_load_synthetic_and_files(tmp_path):
    probs = load_benchmark("synthetic", limit=5, seed=1)
    assert len(probs) == 5 and {p.kind for p in probs} == {"exact"}
    assert all(p.answer.isdigit() for p in probs)
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"problem": "1+1?", "answer": 2}) + "\n\n"
        + json.dumps({"question": "Pick.\nA) x\nB) y", "answer": "B", "id": 9}) + "\n"
    )  # fmt: skip
    a, b = load_benchmark(str(path))
    assert (a.id, a.question, a.answer, a.kind) == ("mine-1", "1+1?", "2", "math")
    assert (b.id, b.kind) == ("9", "choice")
    assert load_benchmark(str(path), kind="exact")[0].kind == "exact"
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    assert load_benchmark(str(listed))[0].answer == "a"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", "mine.jsonl:1: not valid JSON"),
        ('{"question": "q"}\n', "needs a question"),
        ("[1, 2]", "record 1 is a int"),
    ],
)
def test_bad_benchmark_files(tmp_path, content, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_benchmark(str(path))


def test_unknown_benchmark(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")
    with pytest.raises(ValueError, match="not found"):
        load_benchmark("aime24", data_dir=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("synthetic", limit=0)
    assert "synthetic" in benchmarks_data.BENCHMARKS


# ----------------------------------------------------------------------------- CLI


def test_cli_with_stand_in_engine(tmp_path, monkeypatch, capsys):
    """`multiverse eval` end to end with the scripted stand-in in place of multiverse.LLM."""
    from multiverse import cli

    _stand_in_engine(monkeypatch, load_benchmark("synthetic", limit=4))
    out_dir = tmp_path / "res"
    argv = ["eval", "--model", str(tmp_path), "--benchmark", "synthetic", "--limit", "4",
            "--batch-size", "2", "--output", str(out_dir)]  # fmt: skip
    assert cli.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n"] == 4 and last["accuracy"] == 1.0 and last["speedup"] == 1.5
    assert (out_dir / "results.json").exists() and (out_dir / "speedup.png").exists()
    assert "speedup_by_batch" not in last  # one batch size: no per-size table
    # several batch sizes in one run: the first gives accuracy and # parallel, each size a speedup
    argv[argv.index("--batch-size") + 1 : argv.index("--batch-size") + 2] = ["2", "1", "2"]
    assert cli.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["batch_size"] == 2 and last["speedup_by_batch"] == {"2": 1.5, "1": 1.5}
    assert last["by_batch"]["1"]["n"] == 4 and last["by_batch"]["1"]["batch_size"] == 1
    rows = (out_dir / "results.md").read_text().splitlines()
    assert [r.split("|")[-3].strip() for r in rows[2:4]] == ["2", "1"]
    assert cli.main(["eval", "--model", str(tmp_path), "--benchmark", "nope"]) == 2
    assert cli.main(["eval", "--model", str(tmp_path / "x"), "--benchmark", "synthetic"]) == 2
    assert "no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real engine


def _tiny_model_dir(path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = default_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_with_real_engine_on_tiny_random_model(tmp_path, capsys):
    """Integration: the real engine on a tiny random model; answers are garbage, so only the
    structure of the results is checked."""
    from multiverse import cli

    model = _tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "res"
    argv = ["eval", "--model", str(model), "--benchmark", "synthetic", "--limit", "3",
            "--batch-size", "2", "--max-tokens", "12", "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["n"] == 3 and len(data["samples"]) == 3
    assert 0.0 <= data["accuracy"] <= 1.0 and 0.0 <= data["trigger_rate"] <= 1.0
    assert data["parallel_degree"] >= 1.0
    assert data["speedup"] is not None and data["speedup"] > 0
    for s in data["samples"]:
        assert 1 <= s["depth_tokens"] <= 12
        assert s["completion_tokens"] >= s["depth_tokens"]
        assert isinstance(s["text"], str) and isinstance(s["text_sequential"], str)
    assert (out / "results.md").read_text().startswith("| benchmark |")
    assert (out / "speedup.png").exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3


def test_eval_real_engine_forced_multiverse_answer(tmp_path):
    """Integration: the real engine writes a known Multiverse answer (its forced-output test
    hook) for a nested synthetic problem; forking on must yield the same canonical text, the
    layout rule's # parallel, a correct grade, and forking off the same text sequentially."""
    from multiverse import LLM, SamplingParams
    from multiverse.eval import tasks
    from multiverse.eval.datasets import problems_from_records
    from multiverse.format import grammar
    from multiverse.format import layout as attention

    llm = LLM(str(_tiny_model_dir(tmp_path / "tiny")))
    rec = tasks.generate(1, seed=0, split="test", tasks=["nested_max"])[0]
    forced = tasks.assistant_text(rec) + "<|im_end|>"
    res = evaluate.evaluate(
        llm, llm.tokenizer, problems_from_records([rec.to_dict()], "synthetic"),
        max_tokens=400, params=lambda **kw: SamplingParams(**kw, forced_output=forced),
    )  # fmt: skip
    x = res.samples[0]
    assert x.text == tasks.assistant_text(rec) == x.text_sequential
    assert x.correct and x.correct_sequential and x.extracted == str(rec.answer)
    assert x.blocks == 2 and x.max_depth == 2
    tok = llm.tokenizer
    ids = tok.encode(x.text, add_special_tokens=False)
    lay = attention.layout(ids, grammar.tag_ids(tok))
    assert x.depth_tokens == lay.depth_tokens(0)
    assert x.parallel_degree == pytest.approx(len(ids) / lay.depth_tokens(0))
    assert x.parallel_degree > 1.1
    s = res.summary()
    assert s["trigger_rate"] == 1.0 and s["speedup"] is not None


def test_synthetic_default_mix_leaves_out_the_warm_up():
    from multiverse.eval import tasks

    problems = load_benchmark("synthetic", limit=60)
    assert not any(p.id.startswith("countdown_warmup-") for p in problems)
    assert "countdown_warmup" in tasks.TASKS and "countdown_warmup" not in tasks.EVAL_TASKS
    assert {p.id.split("-")[0] for p in load_benchmark("synthetic", 5, tasks=["countdown"])} == {"countdown"}


# ----------------------------------------------------------------------------- tasks a model learned


def _record(model_dir, tasks_trained, **extra):
    model_dir.mkdir(parents=True, exist_ok=True)
    row = {"tasks": tasks_trained, "records": 10, "mode": "multiverse", **extra}
    (model_dir / "train_summary.json").write_text(json.dumps(row))
    return model_dir


def test_synthetic_tasks_follow_the_model_record(tmp_path):
    from multiverse.eval import tasks
    from multiverse.eval.datasets import synthetic_tasks_for

    model = _record(tmp_path / "m", ["countdown_warmup", "countdown"])
    choice = synthetic_tasks_for(model)
    assert choice.tasks == ("countdown",) and choice.recorded
    assert choice.message == (
        f"tasks: countdown (recorded in {model / 'train_summary.json'}; "
        "left out as training-only: countdown_warmup)"
    )
    both = synthetic_tasks_for(_record(tmp_path / "two", ["max_total", "nested_max"]))
    assert both.tasks == ("max_total", "nested_max") and both.message.startswith("tasks: max_total, nested_max (")
    for trained in ([], ["countdown_warmup"], ["my_own_data"]):  # nothing evaluable recorded
        choice = synthetic_tasks_for(_record(tmp_path / f"n{len(trained)}{trained[:1]}", trained))
        assert choice.tasks == tasks.EVAL_TASKS and not choice.recorded
        assert choice.message.startswith("warning: ") and "no evaluable synthetic task" in choice.message
    bare = synthetic_tasks_for(tmp_path / "bare")  # no record at all (or not a directory)
    assert bare.tasks == tasks.EVAL_TASKS and not bare.recorded
    assert bare.message.startswith("warning: ") and "records no training tasks" in bare.message
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train_summary.json").write_text('{"tasks": "countdown"}')
    with pytest.raises(ValueError, match=r"bad/train_summary.json: 'tasks' must be a list"):
        synthetic_tasks_for(tmp_path / "bad")


def test_shipped_models_record_countdown():
    from multiverse.eval.datasets import synthetic_tasks_for
    from multiverse.train.summary import read_training_record

    for name, mode in (("multiverse-tiny", "multiverse"), ("autoregressive-tiny", "autoregressive")):
        model = REPO / "models" / name
        if not (model / "config.json").is_file():
            pytest.skip(f"shipped model {model} not present")
        record = read_training_record(model)
        assert record is not None and record.tasks == ("countdown_warmup", "countdown")
        assert (record.records, record.mode) == (20800, mode)
        assert synthetic_tasks_for(model).tasks == ("countdown",)


def _stand_in_engine(monkeypatch, problems):
    import multiverse

    script = {
        p.question: (_out(BLOCK.format(p.answer), 30, 20), _out(PLAIN.format(p.answer), 30, 30))
        for p in problems
    }
    clock = FakeClock()

    class StandIn(ScriptedLLM):
        def __init__(self, model_dir, device="cpu", dtype="float32"):
            super().__init__(clock, script)

    monkeypatch.setitem(vars(multiverse), "LLM", StandIn)
    monkeypatch.setitem(vars(multiverse), "SamplingParams", Params)
    monkeypatch.setattr(evaluate, "CLOCK", clock)


def test_eval_synthetic_defaults_to_the_tasks_the_model_learned(tmp_path, monkeypatch, capsys):
    from multiverse import cli

    countdown = load_benchmark("synthetic", limit=3, tasks=["countdown"])
    other = load_benchmark("synthetic", limit=3) + load_benchmark("synthetic", limit=3, tasks=["max_total"])
    _stand_in_engine(monkeypatch, countdown + other)
    model = _record(tmp_path / "model", ["countdown_warmup", "countdown"])
    argv = ["eval", "--model", str(model), "--benchmark", "synthetic", "--limit", "3",
            "--output", str(tmp_path / "res")]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"tasks: countdown (recorded in {model / 'train_summary.json'}" in err
    samples = json.loads((tmp_path / "res" / "results.json").read_text())["samples"]
    assert [s["id"] for s in samples] == [p.id for p in countdown]
    assert all(s["id"].startswith("countdown-") for s in samples)
    # no record: the default mix, with a warning
    (model / "train_summary.json").unlink()
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "records no training tasks" in err
    samples = json.loads((tmp_path / "res" / "results.json").read_text())["samples"]
    assert [s["id"] for s in samples] == [p.id for p in load_benchmark("synthetic", limit=3)]
    # --tasks wins over the record, silently
    _record(model, ["countdown"])
    assert cli.main([*argv, "--tasks", "max_total"]) == 0
    err = capsys.readouterr().err
    assert "tasks: " not in err and "warning" not in err
    samples = json.loads((tmp_path / "res" / "results.json").read_text())["samples"]
    assert all(s["id"].startswith("max_total-") for s in samples)
    (model / "train_summary.json").write_text("{oops")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "train_summary.json: not valid JSON" in err and "Traceback" not in err


def test_demo_takes_its_problems_from_the_record(tmp_path, monkeypatch, capsys):
    """`multiverse demo` poses the recorded tasks (stand-in engine and solver)."""
    import io

    import multiverse
    from multiverse.cli import demo_model
    from multiverse.eval import tasks

    posed = []

    class StandIn:
        def __init__(self, model_dir, device="cpu", dtype="float32"):
            self.tokenizer = default_tokenizer()

        def generate(self, prompts, params):
            return []

    def solve(llm, record, twin=None, off_first=False):
        posed.append(record.task)
        text = tasks.assistant_text(record)
        return demo_model.DemoResult(
            task=record.task, question=record.question, reference=str(record.answer), text=text,
            answer=str(record.answer), correct=True, parallel_degree=2.0, completion_tokens=20,
            depth_tokens=10, forced_tokens=0, blocks=1, branches=2, seconds_on=1.0, seconds_off=2.0,
            tokens_off=20, correct_off=True,
        )  # fmt: skip

    monkeypatch.setitem(vars(multiverse), "LLM", StandIn)
    monkeypatch.setattr(demo_model, "solve", solve)
    model = _tiny_model_dir(tmp_path / "model")
    _record(model, ["countdown_warmup", "countdown"])
    printed = io.StringIO()
    assert demo_model.run_model_demo(model, 2, out=printed, twin_dir="", threads=1) == 0
    assert posed == ["countdown", "countdown"]
    assert "threads 1 of" in printed.getvalue() and "torch " in printed.getvalue()
    assert "tasks: countdown (recorded in" in capsys.readouterr().err
    (model / "train_summary.json").unlink()
    posed.clear()
    assert demo_model.run_model_demo(model, 3, out=io.StringIO(), twin_dir="") == 0
    assert "warning: " in capsys.readouterr().err
    assert set(posed) <= set(tasks.EVAL_TASKS) and len(posed) == 3


def test_eval_records_threads_versions_and_commit(tmp_path, monkeypatch, capsys):
    import torch

    from multiverse import cli

    _stand_in_engine(monkeypatch, load_benchmark("synthetic", limit=2))
    out_dir = tmp_path / "res"
    argv = ["eval", "--model", str(tmp_path), "--benchmark", "synthetic", "--limit", "2",
            "--threads", "1", "--output", str(out_dir)]  # fmt: skip
    assert cli.main(argv) == 0
    env = json.loads((out_dir / "results.json").read_text())["environment"]
    assert env["threads"] == 1 == torch.get_num_threads()
    assert env["torch"] == torch.__version__ and env["transformers"]
    assert "git_commit" in env and env["cpu_count"] >= 1


def test_eval_interrupted_writes_partial_results(tmp_path, monkeypatch, capsys):
    from multiverse import cli

    problems = load_benchmark("synthetic", limit=4)
    _stand_in_engine(monkeypatch, problems)
    import multiverse

    stand_in = vars(multiverse)["LLM"]

    class Interrupting(stand_in):
        def generate(self, prompts, params):
            if len(self.calls) >= 2 + 2 * 2:  # warm-up (2 calls), then two batches of both modes
                raise KeyboardInterrupt
            return super().generate(prompts, params)

    monkeypatch.setitem(vars(multiverse), "LLM", Interrupting)
    out_dir = tmp_path / "res"
    argv = ["eval", "--model", str(tmp_path), "--benchmark", "synthetic", "--limit", "4",
            "--output", str(out_dir)]  # fmt: skip
    assert cli.main(argv) == 130
    data = json.loads((out_dir / "results.json").read_text())
    assert data["complete"] is False and data["n"] == 2 and data["problems_requested"] == 4
    assert len(data["samples"]) == 2 and "interrupted" in capsys.readouterr().err


def test_warm_up_generates_the_first_answer_in_full():
    res, llm = _run(1)
    warm = llm.calls[:2]
    assert [p.max_tokens for _, p in warm] == [64, 64] and len(warm[0][0]) == 1
