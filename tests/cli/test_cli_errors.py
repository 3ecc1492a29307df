"""Every command turns load, OS and argument errors into one line on stderr and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from multiverse.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "multiverse-tiny"
EXAMPLE = REPO / "multiverse" / "examples" / "example.txt"


@pytest.fixture(scope="module")
def bad_paths(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bad")
    not_model = base / "not-a-model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello\n")
    truncated = base / "truncated"
    truncated.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (truncated / name).write_bytes((SHIPPED / name).read_bytes())
    (truncated / "model.safetensors").write_bytes((SHIPPED / "model.safetensors").read_bytes()[:5000])
    read_only = base / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    blocker = base / "a-file"
    blocker.write_text("x")
    return {"not_model": not_model, "truncated": truncated, "read_only": read_only, "blocker": blocker}


# (argv with {placeholders}, what the message must name)
CASES = [
    (["generate", "--model", "{not_model}", "hi"], "{not_model}"),
    (["generate", "--model", "{truncated}", "hi"], "{truncated}"),
    (["generate", "--model", str(SHIPPED), "--dtype", "int8", "hi"], "--dtype"),
    (["generate", "--model", str(SHIPPED), "--device", "bogus", "hi"], "--device bogus"),
    (["generate", "--model", str(SHIPPED), "--prompts", "{blocker}/x.txt"], "--prompts"),
    (["generate", "--model", str(SHIPPED), "--threads", "0", "hi"], "--threads"),
    (["inspect", str(EXAMPLE), "--plot", "{blocker}/mask.png"], "--plot"),
    (["inspect", "{blocker}/missing.txt"], "missing.txt"),
    (["eval", "--model", str(SHIPPED), "--benchmark", "synthetic", "--limit", "1",
      "--output", "{blocker}/out"], "--output"),  # fmt: skip
    (["eval", "--model", str(SHIPPED), "--benchmark", "synthetic", "--device", "bogus"], "--device"),
    (["demo", "--model", "/tmp/nope-multiverse-model"], "/tmp/nope-multiverse-model"),
    (["demo", "--problems", "0"], "--problems"),
    (["inspect", str(EXAMPLE), "--plot-tokens", "9:3"], "--plot-tokens"),
    (["generate", "--no-such-option"], "--no-such-option"),
]


@pytest.mark.parametrize("argv,names", CASES, ids=[" ".join(c[0][:4]) for c in CASES])
def test_error_is_one_line_and_exit_2(argv, names, bad_paths, capsys):
    argv = [a.format(**bad_paths) for a in argv]
    names = names.format(**bad_paths)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith(("loading ", "tasks:", "prompt format:"))]
    assert len(err) == 1, err
    assert "error" in err[0] and names in err[0] and "Traceback" not in err[0]


def test_unwritable_output_directory(bad_paths, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    argv = ["eval", "--model", str(SHIPPED), "--benchmark", "synthetic", "--limit", "1",
            "--output", str(bad_paths["read_only"] / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "--output" in capsys.readouterr().err
