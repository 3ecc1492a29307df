"""``--base-url`` on ``multiverse generate`` and ``multiverse eval``: the same results from a real
``multiverse serve`` as from the local model (greedy, exact merge); clear errors for options that
contradict each other."""

from __future__ import annotations

import json

import pytest
from conftest import API_KEY

from multiverse.cli import main
from multiverse.locations import find_model

QUESTION = "Count down by 3 from r 92, s 63, t 92, u 76, v 54, w 64 as far as it goes. What is the sum of the ends?"


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_generate_base_url_equals_the_local_model(tiny_server, capsys, monkeypatch):
    url = tiny_server[0]
    assert main(["generate", "--model", str(find_model()), "--json", QUESTION]) == 0
    local = _last_json(capsys.readouterr().out)["outputs"][0]
    monkeypatch.setenv("MULTIVERSE_API_KEY", API_KEY)  # the key from the environment, not argv
    assert (
        main(
            [
                "generate",
                "--base-url",
                f"{url}/v1",
                "--tokenizer",
                str(find_model()),
                "--json",
                QUESTION,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    remote = _last_json(captured.out)["outputs"][0]
    assert "parallel suffix" in captured.err  # the record of --tokenizer DIR
    assert (
        remote["text"] == local["text"]
        and remote["tree"] == local["tree"]
        and remote["merge"] == "exact"
    )
    assert (
        remote["usage"]["blocks"] >= 1
        and remote["http_requests"] >= 2 + remote["usage"]["branches"]
    )


def test_eval_base_url_gives_the_local_figures(tiny_server, tmp_path, capsys, monkeypatch):
    url = tiny_server[0]
    common = ["eval", "--benchmark", "synthetic", "--limit", "2", "--no-speedup"]
    assert main([*common, "--model", str(find_model()), "--output", str(tmp_path / "local")]) == 0
    local = _last_json(capsys.readouterr().out)
    monkeypatch.setenv("MULTIVERSE_API_KEY", API_KEY)
    argv = [
        *common,
        "--base-url",
        url,
        "--tokenizer",
        str(find_model()),
        "--output",
        str(tmp_path / "remote"),
    ]
    assert main(argv) == 0
    remote = _last_json(capsys.readouterr().out)
    for key in ("n", "accuracy", "parallel_degree", "trigger_rate"):
        assert remote[key] == local[key], key
    env = json.loads((tmp_path / "remote" / "results.json").read_text())["environment"]["remote"]
    assert env["merge"] == "exact" and env["base_urls"] == [url]
    assert remote["trigger_rate"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["generate", "--base-url", "http://127.0.0.1:9", "--model", "x", "q"],
            "--base-url and --model",
        ),
        (["generate", "--base-url", "ftp://x", "q"], "not an http"),
        (["generate", "--base-url", "http://127.0.0.1:9", "q"], "cannot reach"),
        (
            ["eval", "--benchmark", "synthetic"],
            "--model DIR|FILE.gguf (a local model) or --base-url",
        ),
    ],
)
def test_base_url_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_demo_base_url(tiny_server, capsys, monkeypatch):
    monkeypatch.setenv("MULTIVERSE_API_KEY", API_KEY)
    argv = ["demo", "--base-url", tiny_server[0], "--tokenizer", str(find_model()), "--problems", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "summary: " in out and "block" in out and "speedup" in out
