"""What people read from the commands: help for every option, the recorded prompt format, file
line numbers, per-file JSON, no BrokenPipe traceback, threads recorded, partial eval results."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from multiverse.cli import build_parser, main
from multiverse.train.summary import prompt_format

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
TRACE = (
    "问题:\nWhat is 1+1?\n\n模型解答:\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    "<Think>\nline one\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n</Goal>\n<Path>\n2: a\n"
    "</Path>\n<Conclusion>\nc\n</Conclusion>\n</Parallel>\n</Think>\n\nAnswer: 2<|im_end|>\n\n"
    "参考答案: 2\n\n是否正确: 是\n"
)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_option_of_every_command_has_help_and_a_default():
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"inspect", "generate", "eval", "demo", "train", "grade-traces"} <= set(commands)
    missing = []
    for name, sub in [("multiverse", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            flag = "/".join(action.option_strings) or action.dest
            text = action.help or ""
            if not text.strip():
                missing.append(f"{name} {flag}: no help")
            takes_value = action.nargs != 0 and action.option_strings
            if takes_value and not action.required and not ("default" in text or "required" in text):
                missing.append(f"{name} {flag}: help names no default")
    assert not missing, missing


def test_shipped_models_record_their_prompt_format():
    assert prompt_format(MODELS / "multiverse-tiny").suffix == "parallel"
    assert prompt_format(MODELS / "autoregressive-tiny").suffix == "sequential"
    for name in ("multiverse-tiny", "autoregressive-tiny"):
        data = json.loads((MODELS / name / "train_summary.json").read_text())
        assert data["prompt"]["suffix"] in ("parallel", "sequential") and data["global_step"] == 1300


def test_prompt_format_of_a_model_recording_nothing(tmp_path):
    assert prompt_format(tmp_path) is None
    (tmp_path / "train_summary.json").write_text('{"tasks": [], "prompt": {"suffix": "loud"}}')
    with pytest.raises(ValueError, match="prompt"):
        prompt_format(tmp_path)


def test_generate_applies_the_recorded_suffix():
    pytest.importorskip("transformers")
    from multiverse.cli.generate import prompt_texts
    from multiverse.format.prompts import PROMPT_SUFFIX_PARALLEL, PROMPT_SUFFIX_SEQUENTIAL
    from multiverse.format.tokenizer import load_tokenizer

    tok = load_tokenizer(str(MODELS / "multiverse-tiny"))
    texts, note = prompt_texts(["What is 2+2?"], tok, MODELS / "multiverse-tiny")
    assert PROMPT_SUFFIX_PARALLEL.strip() in texts[0] and "parallel suffix" in note
    texts, note = prompt_texts(["What is 2+2?"], tok, MODELS / "autoregressive-tiny")
    assert PROMPT_SUFFIX_SEQUENTIAL.strip() in texts[0] and "sequential suffix" in note
    texts, note = prompt_texts(["What is 2+2?"], tok, MODELS / "multiverse-tiny", suffix=False)
    assert "parallel" not in texts[0] and "--no-prompt-suffix" in note
    texts, note = prompt_texts(["What is 2+2?"], tok, MODELS / "multiverse-tiny", raw=True)
    assert texts == ["What is 2+2?"] and "raw" in note


def test_generate_says_when_a_model_records_no_format(tmp_path):
    pytest.importorskip("transformers")
    from multiverse.cli.generate import prompt_texts
    from multiverse.format.tokenizer import load_tokenizer

    tok = load_tokenizer(str(MODELS / "multiverse-tiny"))
    texts, note = prompt_texts(["q"], tok, tmp_path)
    assert "records no prompt format" in note and "Think step by step" not in texts[0]


def test_eval_asks_with_the_recorded_suffix_else_the_parallel_one(tmp_path):
    from multiverse.cli.evaluation import eval_prompt

    sub = _subparsers(build_parser())["eval"]

    def ask(model, *flags):
        return eval_prompt(sub.parse_args(["--model", str(model), "--benchmark", "synthetic", *flags]), model)

    assert ask(MODELS / "multiverse-tiny")[0] is True
    parallel, note = ask(MODELS / "autoregressive-tiny")  # the twin records the sequential suffix
    assert parallel is False and "sequential suffix" in note and "train_summary.json" in note
    parallel, note = ask(tmp_path)  # no record: the benchmark default, said so
    assert parallel is True and "records no prompt format" in note
    assert ask(MODELS / "multiverse-tiny", "--sequential-prompt") == (
        False, "prompt format: SPEC 1.3 sequential suffix (--sequential-prompt)")  # fmt: skip
    assert ask(MODELS / "autoregressive-tiny", "--parallel-prompt")[0] is True
    with pytest.raises(SystemExit):
        sub.parse_args(["--model", "m", "--benchmark", "synthetic", "--parallel-prompt", "--sequential-prompt"])


def test_eval_progress_shows_dashes_before_the_first_result():
    from multiverse.cli.evaluation import progress_stats

    assert progress_stats({"accuracy": None, "parallel_degree": None}) == "accuracy=- # parallel=-"
    assert progress_stats({"accuracy": 0.995, "parallel_degree": 2.6472}) == "accuracy=0.995 # parallel=2.65"


def test_a_checkpoint_is_asked_like_its_finished_run(tmp_path):
    from multiverse.cli.common import record_dir

    ckpt = tmp_path / "checkpoint-100"
    other = tmp_path / "best"
    ckpt.mkdir(), other.mkdir()
    assert record_dir(ckpt, None) == ckpt  # the run has written no record yet
    (tmp_path / "train_summary.json").write_text('{"tasks": ["countdown"], "mode": "autoregressive"}')
    assert record_dir(ckpt, None) == tmp_path
    assert prompt_format(record_dir(ckpt, None)).suffix == "sequential"
    assert record_dir(other, None) == other  # only the trainer's checkpoint-N directories
    (ckpt / "train_summary.json").write_text('{"tasks": []}')
    assert record_dir(ckpt, None) == ckpt  # its own record first
    assert record_dir(tmp_path / "model", ckpt) == ckpt  # the adapter's record


def test_inspect_reports_file_line_numbers(tmp_path, capsys):
    path = tmp_path / "trace.txt"
    path.write_text(TRACE.replace("<Path>\n2: a", "<Path>\n3: a"))  # label mismatch: an issue
    assert main(["inspect", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = TRACE.splitlines()
    path_line = lines.index("<Path>") + 1  # the file line of the bad <Path>
    assert rep["errors"] and {e["line"] for e in rep["errors"]} <= set(range(path_line, path_line + 2))


def test_inspect_json_dir_one_object_per_file_then_summary(tmp_path, capsys):
    for k in range(3):
        (tmp_path / f"t{k}.txt").write_text(TRACE if k else TRACE.replace("</Think>", ""))
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["source"] for r in rows[:3]] == [str(tmp_path / f"t{k}.txt") for k in range(3)]
    summary = rows[-1]
    assert summary["summary"] is True and summary["files"] == 3
    assert summary["valid"] == sum(r["valid"] for r in rows[:3]) and not rows[0]["valid"]
    assert sum(summary["violation_kinds"].values()) == sum(len(r["errors"]) for r in rows[:3]) > 0
    assert all("N" in kind or not any(c.isdigit() for c in kind) for kind in summary["violation_kinds"])


def test_inspect_into_a_closed_pipe_prints_no_traceback(tmp_path):
    for k in range(30):
        (tmp_path / f"t{k}.txt").write_text(TRACE)
    cmd = [sys.executable, "-c", "import sys; from multiverse.cli import main; sys.exit(main())",
           "inspect", "--json", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(f"{' '.join(map(repr, cmd))} | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_log_level_is_global():
    assert build_parser().parse_args(["--log-level", "debug", "inspect", "x"]).log_level == "debug"
    assert main(["--log-level", "loud", "inspect", "x"]) == 2
    import logging

    from multiverse.cli.common import apply_threads

    main(["--log-level", "info", "inspect", str(REPO / "multiverse" / "examples" / "example.txt")])
    assert logging.getLogger("multiverse").level == logging.INFO
    logging.getLogger("multiverse").setLevel(logging.WARNING)
    assert apply_threads(1) == 1


def test_plot_of_a_long_text_is_cropped_to_its_blocks_and_zoomable(tmp_path):
    pytest.importorskip("matplotlib")
    from multiverse.cli.pictures import plot_range
    from multiverse.eval.structure import inspect_text

    block = TRACE.split("<|im_start|>assistant\n", 1)[1].split("\n\nAnswer", 1)[0]
    text = block.replace("<Think>\n", "<Think>\n" + "word " * 3000 + "\n")
    rep = inspect_text(text)
    start, end = plot_range(rep)
    assert 2900 < start < end <= len(rep.layout)
    assert plot_range(rep, (10, 50)) == (10, 50)
    path = tmp_path / "long.txt"
    path.write_text(text)
    assert main(["inspect", str(path), "--plot", str(tmp_path / "m.png"), "--plot-tokens", "3000:3040"]) == 0
    assert (tmp_path / "m.png").stat().st_size > 0
