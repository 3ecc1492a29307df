"""journal (append-only, crash-tolerant, keyed by inputs + prompt version + model + sampling),
inputs, and the client's Retry-After parsing."""

import json

from multiverse.curate import journal as J
from multiverse.curate.client import retry_after
from multiverse.curate.inputs import read_inputs, stable_id


def test_keys_change_with_every_part_of_the_request():
    msgs = [{"role": "user", "content": "x"}]
    base = J.request_key("r1", "summarise", msgs, "summarise-v1-aa", "m", {"temperature": 0.0})
    assert base == J.request_key("r1", "summarise", [dict(msgs[0])], "summarise-v1-aa", "m", {"temperature": 0.0})
    others = [
        J.request_key("r2", "summarise", msgs, "summarise-v1-aa", "m", {"temperature": 0.0}),
        J.request_key("r1", "parallelise", msgs, "summarise-v1-aa", "m", {"temperature": 0.0}),
        J.request_key("r1", "summarise", [{"role": "user", "content": "y"}], "summarise-v1-aa", "m", {"temperature": 0.0}),
        J.request_key("r1", "summarise", msgs, "summarise-v2-bb", "m", {"temperature": 0.0}),
        J.request_key("r1", "summarise", msgs, "summarise-v1-aa", "m2", {"temperature": 0.0}),
        J.request_key("r1", "summarise", msgs, "summarise-v1-aa", "m", {"temperature": 0.7}),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_journal_survives_a_line_cut_short_and_keeps_appending(tmp_path):
    path = tmp_path / "journal.jsonl"
    j = J.Journal(path)
    j.put("a", {"reply": "1"})
    j.put("b", {"reply": "2"})
    j.close()
    with path.open("a") as f:
        f.write('{"key": "c", "reply": "3"')  # a crash mid-write
    j = J.Journal(path)
    assert len(j) == 2 and j.get("b")["reply"] == "2" and j.get("c") is None
    j.put("c", {"reply": "3"})
    j.close()
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_inputs_field_names_chat_messages_ids_and_bad_rows(tmp_path):
    rows = [
        {"question": "q1", "chain": "c1", "answer": 1, "id": "x"},
        {"problem": "q2", "solution": "s2", "answer": "2"},
        {"question": "q3", "thinking": "t3"},
        {"messages": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "<Think>\nt4\n</Think>\n\nAnswer: 4"}]},
        {"question": "only"},
        {"question": "q1", "chain": "c1", "id": "x"},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    recs, bad = read_inputs(path)
    assert [r.id for r in recs] == ["x", stable_id("q2", "s2"), stable_id("q3", "t3"), stable_id("q4", "<Think>\nt4\n</Think>")]
    assert recs[3].answer == "4" and recs[3].question == "q4" and recs[1].answer == "2"
    assert [reason.split(" (")[0] for _, reason in bad] == [
        "needs a question and a chain", "duplicate id x", "invalid JSON: Expecting value"]


def test_retry_after_seconds_and_http_dates():
    assert retry_after("2") == 2.0 and retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_budget_stops_intake_at_requests_tokens_and_cost():
    import pytest

    from multiverse.curate.curator import Budget, StopIntake

    b = Budget(max_requests=2)
    b.take()
    b.take()
    with pytest.raises(StopIntake, match="--max-requests 2"):
        b.take()
    b = Budget(max_tokens=100)
    b.take()
    b.spent(60, 40)
    with pytest.raises(StopIntake, match="--max-tokens 100"):
        b.take()
    b = Budget(max_cost=0.01, price_in=1.0, price_out=10.0)  # dollars per million tokens
    b.take()
    b.spent(5000, 500)
    assert b.cost == pytest.approx(0.01)
    with pytest.raises(StopIntake, match="--max-cost"):
        b.take()


def test_parquet_inputs(tmp_path):
    import pytest

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"problem": ["q1", "q2"], "solution": ["s1", "s2"], "answer": ["1", "2"]}), tmp_path / "in.parquet")
    recs, bad = read_inputs(tmp_path / "in.parquet")
    assert [r.question for r in recs] == ["q1", "q2"] and recs[0].source == "in.parquet:row 0" and not bad
