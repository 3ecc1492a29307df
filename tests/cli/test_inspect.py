"""`multiverse inspect`: text report, JSON, traces, plot, HTML, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from multiverse.cli import main
from multiverse.eval.structure import extract_assistant, inspect_text, load_sources

EXAMPLE = Path(__file__).resolve().parents[2] / "multiverse" / "examples" / "example.txt"


def test_example_report(capsys):
    assert main(["inspect", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "valid: yes" in out and "Path 2.2" in out and "builtin-regex" in out


def test_json_fields(capsys):
    assert main(["inspect", str(EXAMPLE), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("valid", "errors", "blocks", "max_depth", "paths", "total_tokens", "depth_tokens", "parallel_degree", "tokenizer"):
        assert key in d
    assert d["valid"] and d["blocks"] == 2 and d["max_depth"] == 2 and d["paths"] == [2, 2]
    assert d["total_tokens"] > d["depth_tokens"] > 0
    assert d["parallel_degree"] == pytest.approx(d["total_tokens"] / d["depth_tokens"], abs=1e-3)


def test_json_errors_have_line_col(tmp_path, capsys):
    bad = EXAMPLE.read_text().replace("<Outline>\n2: cost of the pens\n</Outline>\n", "")
    f = tmp_path / "bad.txt"
    f.write_text(bad)
    assert main(["inspect", str(f), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert not d["valid"]
    assert any(e["message"].startswith("<Path> 2 has no matching <Outline>") and e["line"] == 13 for e in d["errors"])


def test_jsonl_records_and_stdin(tmp_path, capsys, monkeypatch):
    f = tmp_path / "r.jsonl"
    rec = {"question": "q", "chain": EXAMPLE.read_text(), "answer": "5"}
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<Think>\nx\n</Think>"}]}
    f.write_text(json.dumps(rec) + "\n" + json.dumps(msgs) + "\n")
    assert main(["inspect", str(f), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(x)["blocks"] for x in lines] == [2, 0]
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(EXAMPLE.read_text()))
    assert main(["inspect", "-", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == 2


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    f = tmp_path / "x.jsonl"
    f.write_text('{"chain": "a"}\n{oops\n')
    assert main(["inspect", str(f)]) == 2
    assert "x.jsonl:2: not valid JSON" in capsys.readouterr().err
    f.write_text('{"nothing": 1}\n')
    assert main(["inspect", str(f)]) == 2
    assert "has no text field" in capsys.readouterr().err


def test_every_trace_file(shared_data, capsys):
    traces = shared_data / "traces"
    sources = load_sources(str(traces))
    assert len(sources) == 139
    for s in sources:
        d = inspect_text(s.text, name=s.name).to_dict()
        assert d["total_tokens"] >= d["depth_tokens"] >= 0
        assert d["parallel_degree"] >= 1.0
    assert main(["inspect", str(traces), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    summary = rows[-1]
    assert len(rows) == 140 and summary["summary"] is True
    assert summary["files"] == 139 and 0 < summary["with_parallel"] <= 139
    assert summary["mean_parallel_degree"] > 1.0


def test_trace_extraction(shared_data):
    text = (shared_data / "traces" / "multiverse-32b" / "aime24" / "entry_1.txt").read_text()
    part = extract_assistant(text.split("模型解答:", 1)[1])
    assert part.startswith("<Think>\nOkay") and "提取的答案" not in part and "参考答案" not in part


def test_plot_and_html(tmp_path):
    png, page = tmp_path / "m.png", tmp_path / "m.html"
    assert main(["inspect", str(EXAMPLE), "--plot", str(png), "--html", str(page)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = page.read_text()
    assert html.count('<div class="path">') == 4 and html.count("<details") == 2
    assert "Notebooks $12 and pens $3" in html and "<script" not in html


def test_html_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    page = tmp_path / "m.html"
    assert main(["inspect", str(EXAMPLE), "--html", str(page)]) == 0
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'class="paths"' in dom.stdout and "Path 2.1" in dom.stdout
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 5_000


def test_real_tokenizer_counts(tmp_path, capsys):
    from multiverse.format import grammar
    from multiverse.format.layout import layout
    from multiverse.train.bpe import default_tokenizer

    tok = default_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    assert main(["inspect", str(EXAMPLE), "--json", "--tokenizer", str(tmp_path / "tok")]) == 0
    d = json.loads(capsys.readouterr().out)
    ids = tok.encode(EXAMPLE.read_text(), add_special_tokens=False)
    lay = layout(ids, grammar.tag_ids(tok))
    assert "builtin" not in d["tokenizer"] and str(tmp_path / "tok") in d["tokenizer"]
    assert d["total_tokens"] == len(ids) and d["depth_tokens"] == lay.depth_tokens(0)
    assert main(["inspect", str(EXAMPLE), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_inspect_imports_no_torch():
    """The report is plain Python: ``multiverse inspect`` builds only its own parser and never
    imports torch (a second or more, and some 200 MB, before the first line; the layout's
    tensors are built only for --plot)."""
    code = ("import sys; from multiverse.cli import main; "
            f"assert main(['inspect', {str(EXAMPLE)!r}, '--json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["valid"]
