"""Errors keep their cause: one line for users, the traceback in the log (``--log-level debug``;
always for an unexpected exception). ``serve`` checks its address before the model loads;
``inspect`` refuses binary input and never writes control characters to the terminal."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from multiverse.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "multiverse-tiny"
EXAMPLE = REPO / "multiverse" / "examples" / "example.txt"


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("truncated")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((SHIPPED / name).read_bytes())
    (d / "model.safetensors").write_bytes((SHIPPED / "model.safetensors").read_bytes()[:5000])
    return d


def test_debug_log_shows_the_cause_of_a_one_line_error(truncated, capsys):
    assert main(["generate", "--model", str(truncated), "hi"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("loading ")]
    assert len(err) == 1 and "cannot load" in err[0]  # the user's one line
    assert main(["--log-level", "debug", "generate", "--model", str(truncated), "hi"]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "Traceback" in err
    assert "safetensors" in err.lower()  # the cause, chained below the one-line error


def test_an_unexpected_error_is_one_line_plus_its_traceback(monkeypatch, capsys):
    from multiverse.cli import inspection

    def broken(args):
        return {}["no such key"]  # a bug deep inside a command

    monkeypatch.setattr(inspection, "run", broken)
    assert main(["inspect", str(EXAMPLE)]) == 1
    err = capsys.readouterr().err
    assert "multiverse inspect: error: internal error: KeyError" in err
    assert "Traceback" in err and "broken" in err  # logged at the default level


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_bad_port_before_loading(port, capsys):
    assert main(["serve", "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("multiverse serve: error: --port") and "0-65535" in err[-1]
    assert not any(line.startswith("loading") for line in err) and "Traceback" not in "\n".join(err)


def test_serve_finds_a_port_in_use_before_loading(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"multiverse serve: error: --host 127.0.0.1 --port {port}: cannot listen there")
    assert not any(line.startswith("loading") for line in err)


def test_inspect_refuses_binary_input(tmp_path, capsys):
    rng = random.Random(0)
    blob = tmp_path / "random.bin"
    blob.write_bytes(bytes(rng.getrandbits(8) for _ in range(100_000)))
    no_nul = tmp_path / "random.txt"
    no_nul.write_bytes(blob.read_bytes().replace(b"\x00", b"")[:20_000])
    for path in (blob, no_nul):
        assert main(["inspect", str(path)]) == 2
        out = capsys.readouterr()
        assert out.out == "" and "valid: yes" not in out.err
        assert out.err.strip() == f"multiverse inspect: error: {path}: " + out.err.strip().split(f"{path}: ", 1)[1]
        assert "binary data, not text" in out.err


def test_inspect_escapes_control_characters(tmp_path, capsys):
    f = tmp_path / "colours.txt"
    f.write_text("<Think>\nhello \x1b[31mred\x1b[0m and a bell \x07\n</Think>\n\nAnswer: 1\n")
    assert main(["inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "hello \\x1b[31mred\\x1b[0m" in out
