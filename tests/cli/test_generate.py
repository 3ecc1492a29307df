"""``multiverse generate``: text and JSON output, branch tree drawing, clear errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from _engine_util import block, tiny_pair  # noqa: E402

from multiverse import LLM, SamplingParams  # noqa: E402
from multiverse.cli import main  # noqa: E402
from multiverse.cli.generate import format_tree  # noqa: E402
from multiverse.train.bpe import default_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = default_tokenizer()
    hf, _ = tiny_pair(tok)
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_generate_json(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--max-tokens", "6", "--json", "hello", "world"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [o["prompt"] for o in data["outputs"]] == ["hello", "world"]
    assert all(o["usage"]["depth_tokens"] <= 6 for o in data["outputs"])


def test_generate_text_and_prompts_file(model_dir, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("one\n\ntwo\n")
    assert main(["generate", "--model", str(model_dir), "--prompts", str(f), "--raw", "--no-parallel",
                 "--max-tokens", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "=== one" in out and "=== two" in out and "# parallel 1.00" in out and "main:" in out


def test_missing_model_and_prompt_are_clear_errors(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path)]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_format_tree_draws_nested_blocks():
    tok = default_tokenizer()
    _, ours = tiny_pair(tok)
    text = "<Think>\n" + block([("1", "a\n" + block([("1.1", "x"), ("1.2", "y")])), ("2", "b")]) + "</Think>"
    out = LLM.from_model(ours, tok, num_kv_slots=1024).generate(
        ["q"], SamplingParams(temperature=0.0, forced_output=text))[0]  # fmt: skip
    drawn = format_tree(out, tok)
    assert drawn.splitlines()[0] == f"main: {len(out.token_ids)} tokens"
    assert "├─ 1:" in drawn and "└─ 2:" in drawn and "1.1:" in drawn and "└─ 1.2:" in drawn


def test_generate_reports_the_seed_and_it_replays(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--max-tokens", "12", "--temperature", "1", "hi"]
    runs = []
    for _ in range(2):  # unseeded: each run draws its own seed (a tiny random model: texts differ)
        assert main([*argv, "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs"][0])
    a, b = runs
    assert isinstance(a["seed"], int) and a["seed"] != b["seed"] and a["text"] != b["text"]
    assert a["forking"] == "on"
    assert main([*argv, "--seed", str(a["seed"])]) == 0  # the reported seed replays the text
    out = capsys.readouterr().out
    assert f"=== hi\n{a['text']}\n--- branch tree" in out and f", seed {a['seed']}, forking on" in out
