"""``multiverse curate run`` that ends with records pending says why on the console (the
failures and the retries by reason), not only in ``run.json``."""

import argparse

from curate_standin import StandIn
from test_curate_standin_run import MODEL, _records, _write_inputs

from multiverse.cli import curate as cli


def test_a_run_ending_with_records_pending_prints_the_reasons(tmp_path, capsys):
    records = _records(2)
    s = StandIn(records)
    url = s.start()
    try:
        _write_inputs(tmp_path / "in.jsonl", records)
        s.always[(records[0].question, "summarise")] = "500"  # a server error on every try: stays pending
        p = argparse.ArgumentParser()
        cli.add_arguments(p)
        args = p.parse_args(["run", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--base-url",
                             url, "--model", MODEL, "--max-retries", "1", "--quiet"])  # fmt: skip
        cli.run(args)
        printed = capsys.readouterr().out
        assert f"0 accepted, 0 rejected, {len(records)} pending" in printed  # the rest wait behind it (input order)
        why = [line for line in printed.splitlines() if line.startswith("pending because: ")]
        assert why and "HTTP 500" in why[0] and "after 1 retries" in why[0] and "retries: HTTP 500 1" in why[0]
    finally:
        s.stop()
