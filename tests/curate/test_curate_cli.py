"""``multiverse curate run`` / ``report`` through ``multiverse.cli.curate`` against the stand-in
for a REMOTE LLM; kill -9 mid-run and resume: no finished request repeated, same bytes."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from curate_standin import StandIn
from test_curate_standin_run import MODEL, _records, _write_inputs

from multiverse.cli import curate as cli
from multiverse.curate import journal as J

REPO = Path(__file__).resolve().parents[2]


def _args(argv):
    p = argparse.ArgumentParser(prog="multiverse curate")
    cli.add_arguments(p)
    return p.parse_args(argv)


def test_remote_llm_standin_cli_run_then_report(tmp_path, capsys):
    records = _records(1)
    s = StandIn(records)
    url = s.start()
    try:
        _write_inputs(tmp_path / "in.jsonl", records)
        with (tmp_path / "in.jsonl").open("a") as f:
            f.write('{"question": "no chain"}\n')
        out = tmp_path / "out"
        s.always[(records[0].question, "mapreduce")] = "delete"
        argv = ["run", str(tmp_path / "in.jsonl"), "--output", str(out), "--base-url", url, "--model", MODEL,
                "--concurrency", "3", "--max-regen", "1", "--quiet"]  # fmt: skip
        assert cli.run(_args(argv)) == 0
        printed = capsys.readouterr().out
        assert f"{len(records) - 1} accepted, 1 rejected, 0 pending" in printed and "1 unusable inputs" in printed
        assert cli.run(_args(["report", str(out)])) == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["counts"] == {"inputs": len(records), "accepted": len(records) - 1, "rejected": 1, "pending": 0}
        parallel = sum(r.structure == "parallel" for r in records[1:]) / (len(records) - 1)
        assert parallel < 1.0  # word_sequential has no block: the curator must not invent one
        assert rep["model"] == MODEL and rep["structure"]["trigger_rate"] == pytest.approx(parallel)
        assert "edit distance" in rep["top_failure_reasons"][0]["reason"]
        assert rep["top_failure_reasons"][0]["example_id"] == records[0].id
        assert (out / "report.md").read_text().startswith("# Curation report")
        assert rep["structure"]["parallel_tokenizer"] == "builtin-regex (approximate)"
        tok_dir = REPO / "models" / "multiverse-tiny"  # a real tokenizer: real token counts
        assert cli.run(_args(["report", str(out), "--tokenizer", str(tok_dir)])) == 0
        real = json.loads((out / "report.json").read_text())["structure"]
        assert str(tok_dir) in real["parallel_tokenizer"] and real["parallel_degree_mean"] > 1
        assert rep["structure"]["parallel_degree_mean"] > 1 and len(rep["parallel_degree_per_record"]) == len(records) - 1
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        s.stop()


def test_remote_llm_standin_max_requests_stops_intake_and_rerun_resumes(tmp_path, capsys):
    records = _records(1)
    s = StandIn(records)
    url = s.start()
    try:
        _write_inputs(tmp_path / "in.jsonl", records)
        base = ["run", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"), "--base-url", url,
                "--model", MODEL, "--concurrency", "2", "--quiet"]  # fmt: skip
        assert cli.run(_args([*base, "--max-requests", "5"])) == cli.EXIT_PENDING
        assert "intake stopped: --max-requests 5 reached" in capsys.readouterr().out
        assert len(s.requests) == 5
        assert cli.run(_args(base)) == 0
        rows = J.read_jsonl(tmp_path / "o" / "curated.jsonl")
        assert [r["id"] for r in rows] == [r.id for r in records]
        assert len(s.requests) == sum(2 + r.chain.count("<Parallel>") for r in records)  # nothing asked twice
    finally:
        s.stop()


_CHILD = """
import sys, argparse
sys.path.insert(0, {tests!r})
from multiverse.cli import curate
p = argparse.ArgumentParser(); curate.add_arguments(p)
sys.exit(curate.run(p.parse_args(sys.argv[1:])))
"""


def test_remote_llm_standin_sigkill_and_resume_is_byte_identical(tmp_path):
    records = _records(2)
    s = StandIn(records, latency=0.03)
    url = s.start()
    try:
        _write_inputs(tmp_path / "in.jsonl", records)

        def argv(out):
            return [sys.executable, "-c", _CHILD.format(tests=str(Path(__file__).parent)), "run",
                    str(tmp_path / "in.jsonl"), "--output", str(out), "--base-url", url, "--model", MODEL,
                    "--concurrency", "4", "--quiet"]  # fmt: skip

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(argv(tmp_path / "full"), check=True, env=env, timeout=60, capture_output=True)
        full_requests = len(s.requests)
        s.requests.clear()
        child = subprocess.Popen(argv(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = tmp_path / "killed" / "journal.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < full_requests // 2):
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        J.repair_tail(journal)
        finished = journal.read_text().count("\n")
        assert 0 < finished < full_requests
        time.sleep(0.5)  # requests the killed run had in flight reach the stand-in before the count restarts
        s.requests.clear()
        subprocess.run(argv(tmp_path / "killed"), check=True, env=env, timeout=60, capture_output=True)
        assert len(s.requests) == full_requests - finished  # zero repeated requests for finished steps
        full = (tmp_path / "full" / "curated.jsonl").read_bytes()
        assert full and (tmp_path / "killed" / "curated.jsonl").read_bytes() == full
    finally:
        s.stop()


def test_remote_llm_standin_ctrl_c_stops_intake_then_rerun_finishes(tmp_path):
    records = _records(2)
    s = StandIn(records, latency=0.05)
    url = s.start()
    try:
        _write_inputs(tmp_path / "in.jsonl", records)
        out = tmp_path / "o"
        argv = [sys.executable, "-c", _CHILD.format(tests=str(Path(__file__).parent)), "run", str(tmp_path / "in.jsonl"),
                "--output", str(out), "--base-url", url, "--model", MODEL, "--concurrency", "2", "--quiet"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(J.read_jsonl(out / "curated.jsonl")) < 2:
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=30)
        assert child.returncode == 130 and "intake stopped: stopped by the user" in stdout  # Ctrl-C: 130
        assert "left pending: run the same command again to resume them" in stderr
        first = len(J.read_jsonl(out / "curated.jsonl"))
        assert 2 <= first < len(records)
        subprocess.run(argv, env=env, check=True, timeout=60, capture_output=True)
        assert [r["id"] for r in J.read_jsonl(out / "curated.jsonl")] == [r.id for r in records]
    finally:
        s.stop()


def test_progress_is_a_bar_over_the_records(capsys, monkeypatch):
    from types import SimpleNamespace

    s = SimpleNamespace(skipped_done=2, accepted=3, rejected=1, retries=4, prompt_tokens=10, completion_tokens=5)
    bar = cli._Progress(10)
    bar(s)
    assert bar.bar is not None and bar.bar.n == 6 and bar.bar.total == 10
    s.prompt_tokens = 39_995  # tqdm would print a number 40000 as "4e+4"
    bar(s)
    bar.close()
    err = capsys.readouterr().err
    assert "6/10" in err and "accepted=3" in err and "tokens=15" in err and "tokens=40000" in err
    s.prompt_tokens = 10
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "tqdm"
                        else real_import(name, *a, **k))  # fmt: skip
    line = cli._Progress(10)
    line(s)
    line.close()
    assert "done 6 | accepted 3 | rejected 1 | retries 4 | tokens 15" in capsys.readouterr().err


@pytest.mark.parametrize("status", ["401", "404"])
def test_remote_llm_standin_refusing_endpoint_stops_the_run_and_rejects_nothing(tmp_path, capsys, monkeypatch, status):
    """A missing API key (401) or a wrong --base-url / --model (404) is the endpoint's fault, not
    the records': the run stops with every record pending (exit 1, with a hint), and the rerun
    with the endpoint fixed curates them all (they were once rejected, and then skipped as done)."""
    records = _records(4)
    s = StandIn(records)
    url = s.start()
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    try:
        _write_inputs(tmp_path / "in.jsonl", records)
        out = tmp_path / "out"
        argv = ["run", str(tmp_path / "in.jsonl"), "--output", str(out), "--base-url", url, "--model", MODEL,
                "--concurrency", "2", "--quiet", "--api-key-env", "NO_SUCH_KEY_VAR"]  # fmt: skip
        for r in records:
            s.always[(r.question, "summarise")] = status
        assert cli.run(_args(argv)) == 1
        printed = capsys.readouterr().out
        assert f"0 accepted, 0 rejected, {len(records)} pending" in printed
        assert f"intake stopped: the endpoint refused the request: HTTP {status}" in printed
        assert ("$NO_SUCH_KEY_VAR is not set" in printed) == (status == "401")  # the hint only where it helps
        assert J.read_jsonl(out / "rejected.jsonl") == [] and s.counts[status] <= 2  # no record tried after
        s.always.clear()
        assert cli.run(_args(argv)) == 0
        assert f"{len(records)} accepted, 0 rejected, 0 pending (0 done before" in capsys.readouterr().out
    finally:
        s.stop()


def test_pending_records_exit_non_zero_and_url_credentials_stay_out_of_every_file(tmp_path, capsys):
    """A run that leaves records pending (a request out of retries) exits ``EXIT_PENDING`` and
    says how many and that a rerun resumes them; the rerun finishes them and exits 0. A
    ``user:password@`` in ``--base-url`` is sent as basic auth and is in no error string, no
    ``run.json``, no ``rejected.jsonl`` and nothing printed."""
    import base64

    records = _records(1)
    s = StandIn(records)
    url = s.start()
    try:
        _write_inputs(tmp_path / "in.jsonl", records)
        out = tmp_path / "out"
        assert url.startswith("http://")
        argv = ["run", str(tmp_path / "in.jsonl"), "--output", str(out), "--base-url",
                url.replace("http://", "http://curator:s3cr%40t@"), "--model", MODEL, "--concurrency", "2",
                "--max-retries", "0", "--quiet"]  # fmt: skip
        s.always[(records[0].question, "summarise")] = "400"  # rejected, with the request's error
        s.always[(records[-1].question, "summarise")] = "500"  # out of retries: pending
        assert cli.run(_args(argv)) == cli.EXIT_PENDING
        printed = capsys.readouterr()
        assert f"{len(records) - 2} accepted, 1 rejected, 1 pending" in printed.out
        assert "1 record left pending: run the same command again to resume them" in printed.err
        run_json, rejected = (out / "run.json").read_text(), (out / "rejected.jsonl").read_text()
        host = url.removeprefix("http://").split("/")[0]
        assert f"HTTP 500 from http://{host}/" in run_json and f"HTTP 400 from http://{host}/" in rejected
        for text in (run_json, rejected, printed.out, printed.err):
            assert "s3cr" not in text and "curator:" not in text
        assert s.authorization == {"Basic " + base64.b64encode(b"curator:s3cr@t").decode()}
        s.always.clear()
        assert cli.run(_args(argv)) == 0
        assert "0 pending" in capsys.readouterr().out
    finally:
        s.stop()


def test_help_shows_the_defaults_of_the_request_options():
    p = argparse.ArgumentParser(prog="multiverse curate")
    cli.add_arguments(p)
    run = p._subparsers._group_actions[0].choices["run"]
    helps = {a.option_strings[0]: a.help or "" for a in run._actions if a.option_strings}
    for option, default in (("--timeout", "120"), ("--max-retries", "6"), ("--concurrency", "8")):
        assert f"(default {default})" in helps[option], (option, helps[option])
        assert str(run.get_default(option[2:].replace("-", "_"))).removesuffix(".0") == default


def test_report_of_a_run_with_nothing_accepted_says_so(tmp_path, capsys):
    """(A 135M model's run: every record rejected at summarise.) No per-record figure of 0."""
    row = {"id": "r1", "question": "q", "chain": "c", "stage": "summarise", "curation": {"attempts": 0},
           "reasons": ["summarise: reply still invalid after one repair: the reply is not valid JSON (...)"]}  # fmt: skip
    (tmp_path / "curated.jsonl").write_text("")
    (tmp_path / "rejected.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "run.json").write_text(json.dumps({"inputs": 1, "model": "m", "prompt_tokens": 900, "completion_tokens": 40}))
    assert cli.run(_args(["report", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert "(no attempt reached the checks)" in out and "per accepted record -;" in out
    assert json.loads((tmp_path / "report.json").read_text())["tokens"]["per_accepted_record"] is None
