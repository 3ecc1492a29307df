"""``curate eval``: boundary F1, trigger rate and # parallel against known parallel forms;
end to end with the stand-in for a REMOTE LLM on the synthetic tasks."""

import argparse
import json
import types

from curate_standin import StandIn

from multiverse.cli import curate as cli
from multiverse.curate import evaluate as E
from multiverse.curate import journal as J


def test_marks_and_f1_on_real_traces(tmp_path, shared_data):
    truth = E.ground_truth(str(shared_data / "traces" / "multiverse-32b"), 3)
    assert truth and all(t["id"].startswith("trace-") for t in truth)
    text, blocks, paths = E.marks(truth[0]["chain"])
    assert blocks and len(paths) > len(blocks) and not any(c.isspace() for c in text)
    rows = [{"id": t["id"], "chain": t["chain"]} for t in truth]
    rows[1]["chain"] = "<Think>\n" + E.grammar.flatten(truth[1]["chain"]) + "\n</Think>"  # curated with no block
    (tmp_path / "curated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = E.score(truth, tmp_path)
    assert res["accepted"] == 3 and res["exact"] == 2
    assert 0 < res["block_f1"] < 1 and res["trigger_rate"] == {"original": 1.0, "curated": round(2 / 3, 4)}
    assert res["parallel_degree"]["original"] > 1


def test_mapped_offsets_follow_small_edits():
    assert E._mapped({0, 5}, "abcdefgh", "abcdefgh") == {0, 5}
    assert E._mapped({4}, "abcdefgh", "abXcdefgh") == {5}
    # a path's opening edited away ("Alternatively, if" -> "If"): its start maps to the original's
    assert E._mapped({3, 8}, "abcIfxyz", "abcAlternatively,ifxyz") == {3, 22}


def _standin_eval(tmp_path, truth_arg: str, n: int):
    """``curate eval --truth truth_arg --n n`` against the stand-in for a remote LLM, answering
    for the same ground truth; returns (the ground truth, eval.json)."""
    truth = E.ground_truth(truth_arg, n)
    s = StandIn([types.SimpleNamespace(question=t["question"], chain=t["chain"]) for t in truth])
    url = s.start()
    try:
        p = argparse.ArgumentParser()
        cli.add_arguments(p)
        args = p.parse_args(["eval", "--truth", truth_arg, "--n", str(n), "--output", str(tmp_path / "ev"),
                             "--base-url", url, "--model", "standin-for-remote-llm", "--quiet"])  # fmt: skip
        assert cli.run(args) == 0
    finally:
        s.stop()
    return truth, json.loads((tmp_path / "ev" / "eval.json").read_text())


def test_remote_llm_standin_curate_eval_on_tasks_scores_perfectly(tmp_path, capsys):
    _, res = _standin_eval(tmp_path, "tasks", 6)
    assert res["accepted"] == res["exact"] == 6 and res["block_f1"] == res["path_f1"] == 1.0
    assert res["parallel_degree"]["original"] == res["parallel_degree"]["curated_accepted"] > 1
    out = capsys.readouterr().out
    assert "| standin-for-remote-llm | synthetic tasks | 6 | 6 | 6 | 1.0 | 1.0 |" in out
    # what a user compares LLMs on: requests, output tokens (as the endpoint reported) and wall time
    journal = J.read_jsonl(tmp_path / "ev" / "journal.jsonl")
    assert res["llm_requests"] == len(journal) > 6 and res["wall_s"] > 0
    assert res["llm_output_tokens"] == sum(e["usage"][1] for e in journal) > 0
    assert 0 < res["llm_output_tokens_per_chain_token"] and out.count("\n|---") == 1
    assert f"| {res['llm_output_tokens']} ({res['llm_output_tokens_per_chain_token']}) | {res['wall_s']} |" in out


def test_remote_llm_standin_curate_eval_on_real_traces_scores_perfectly(tmp_path, shared_data):
    traces = str(shared_data / "traces" / "multiverse-32b")
    truth, res = _standin_eval(tmp_path, traces, 4)
    assert res["records"] == res["accepted"] == 4 and res["block_f1"] == res["path_f1"] == 1.0
    assert res["parallel_degree"]["original"] == res["parallel_degree"]["curated_accepted"] > 1
    # the LLM writes a plan and small edits, never the chain: far fewer tokens than the chain has
    written = sum(len(E.grammar.approx_tokens(e["reply"])) for e in J.read_jsonl(tmp_path / "ev" / "journal.jsonl"))
    chain = sum(len(E.grammar.approx_tokens(E.grammar.flatten(t["chain"]))) for t in truth)
    print("output tokens per chain token", written / chain)
    assert written < 0.3 * chain


def test_nothing_accepted_has_no_curated_parallel_degree(tmp_path):
    truth = E.ground_truth("tasks", 2)
    (tmp_path / "curated.jsonl").write_text("")
    res = E.score(truth, tmp_path)
    assert res["accepted"] == 0 and res["parallel_degree"]["curated_accepted"] is None
    assert res["llm_requests"] == res["llm_output_tokens"] == 0  # no journal either
    assert f"| {res['parallel_degree']['original']} / - |" in E.table({**res, "model": "m"}, "synthetic tasks")
