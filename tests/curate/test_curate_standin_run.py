"""End to end through a scripted stand-in for a REMOTE OpenAI-compatible LLM (a real HTTP
server on 127.0.0.1): task records are reproduced exactly, faults are survived or rejected."""

import itertools
import json

import pytest
from curate_standin import StandIn

from multiverse.curate import journal as J
from multiverse.curate.inputs import read_inputs
from multiverse.curate.pipeline import RunConfig, run_sync
from multiverse.eval import tasks
from multiverse.format import grammar

MODEL = "standin-for-remote-llm"


def _records(n_per_task=2):
    return [r for t in sorted(tasks.TASKS) for r in itertools.islice(tasks.iter_records(3, "train", [t]), n_per_task)]


def _write_inputs(path, records):
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps({"id": r.id, "question": r.question, "chain": grammar.flatten(r.chain),
                                "answer": r.answer, "task": r.task}) + "\n")  # fmt: skip


@pytest.fixture()
def standin():
    records = _records()
    s = StandIn(records)
    url = s.start()
    yield s, url, records
    s.stop()


def _config(tmp_path, url, **kw):
    return RunConfig(output=tmp_path / "out", base_url=url, model=MODEL, concurrency=4, backoff=0.01,
                     timeout=kw.pop("timeout", 5.0), **kw)  # fmt: skip


def test_remote_llm_standin_reproduces_every_task_record_exactly(tmp_path, standin, tok):
    s, url, records = standin
    _write_inputs(tmp_path / "in.jsonl", records)
    inputs, bad = read_inputs(tmp_path / "in.jsonl")
    assert bad == []
    summary = run_sync(_config(tmp_path, url), inputs)
    assert (summary.accepted, summary.rejected, summary.pending) == (len(records), 0, 0)
    rows = J.read_jsonl(tmp_path / "out" / "curated.jsonl")
    assert [r["id"] for r in rows] == [r.id for r in records]  # input order
    for row, rec in zip(rows, records, strict=True):
        assert row["chain"] == rec.chain
        assert grammar.flatten(row["sequential_chain"]) == grammar.flatten(rec.sequential_chain)
        assert row["curation"]["model"] == MODEL and row["curation"]["distance"] == 0.0
    assert summary.requests == sum(2 + r.chain.count("<Parallel>") for r in records)
    from multiverse.train import data

    examples, report = data.load_examples(tmp_path / "out" / "curated.jsonl", tok)
    assert report.records == len(records) and not report.skipped and examples
    # running the same command again resumes: nothing left to do, no request sent
    again = run_sync(_config(tmp_path, url), inputs)
    assert again.skipped_done == len(records) and again.requests == 0


def test_remote_llm_standin_faults_are_retried_repaired_or_rejected(tmp_path, standin):
    s, url, records = standin
    by_task = {r.task: r for r in reversed(records)}
    q = {t: r.question for t, r in by_task.items()}
    s.faults[(q["sum_products"], "summarise")] = ["429", "500", "badjson"]
    s.faults[(q["max_total"], "parallelise")] = ["timeout", "length"]
    s.faults[(q["vowel_sum"], "mapreduce")] = ["outlines"]
    s.faults[(q["nested_max"], "mapreduce")] = ["missing_edit"]
    s.always[(q["countdown"], "mapreduce")] = "delete"
    s.faults[(q["wide_max"], "summarise")] = ["badjson", "badjson"]
    _write_inputs(tmp_path / "in.jsonl", records)
    inputs, _ = read_inputs(tmp_path / "in.jsonl")
    summary = run_sync(_config(tmp_path, url, timeout=0.5, max_regen=2), inputs)
    out = tmp_path / "out"
    good = {r["id"]: r for r in J.read_jsonl(out / "curated.jsonl")}
    bad = {r["id"]: r for r in J.read_jsonl(out / "rejected.jsonl")}
    assert set(good) | set(bad) == {r.id for r in records} and not set(good) & set(bad)  # no record lost
    assert summary.pending == 0 and summary.retries >= 3
    assert set(bad) == {by_task["countdown"].id, by_task["wide_max"].id}
    for t in ("sum_products", "max_total", "vowel_sum", "nested_max"):
        assert good[by_task[t].id]["chain"] == by_task[t].chain
    assert good[by_task["sum_products"].id]["curation"]["repairs"] == 1
    assert good[by_task["vowel_sum"].id]["curation"]["invalid_replies"][0].startswith(
        "mapreduce: the block has")
    edits = good[by_task["nested_max"].id]["curation"]["attempt_log"][0]["edits"]
    assert edits and not edits[0]["applied"] and "not found in path 1" in edits[0]["reason"]
    deleted = bad[by_task["countdown"].id]
    assert deleted["stage"] == "checks" and deleted["curation"]["attempts"] == 3
    assert any("edit distance" in x for x in deleted["reasons"])
    assert sum(1 for qq, step in s.requests if qq == q["countdown"] and step == "mapreduce") == 3
    assert "not valid JSON" in bad[by_task["wide_max"].id]["reasons"][0]
    assert bad[by_task["wide_max"].id]["stage"] == "summarise"


def test_remote_llm_standin_client_keeps_one_connection_per_request_in_flight(standin):
    import asyncio

    from multiverse.curate.client import ChatClient

    s, url, records = standin
    payload = {"step": "parallelise", "question": records[0].question}
    messages = [{"role": "user", "content": "INPUT JSON:" + json.dumps(payload)}]

    async def go():
        client = ChatClient(url, MODEL)
        try:
            for _ in range(3):  # three waves of 6 concurrent requests
                done = await asyncio.gather(*(client.complete(messages) for _ in range(6)))
                assert all(json.loads(c.text)["groups"] for c in done)
        finally:
            await client.aclose()
        return client.stats

    stats = asyncio.run(go())
    assert stats.completions == 18
    assert s.connections == 6  # kept alive and reused by the later waves, never more than in flight
