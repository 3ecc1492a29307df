"""serial_branches: the same output as forking on, one branch of the request per step."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, check_output, engine, tiny_pair  # noqa: E402

from multiverse import SamplingParams  # noqa: E402
from multiverse.train.bpe import default_tokenizer  # noqa: E402

TEXT = "<Think>\nfirst\n" + block([
    ("1", "a b c d"),
    ("2", "x\n" + block([("2.1", "p q"), ("2.2", "r")]).rstrip("\n")),
    ("3", "y z w"),
]) + "after\n</Think>\n\nAnswer: 7"  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    tok = default_tokenizer()
    hf, ours = tiny_pair(tok)
    return tok, hf, ours


def _run(llm, serial: bool):
    steps: list[dict[int, int]] = []
    schedule = llm.scheduler.schedule

    def spy(requests):
        works = schedule(requests)
        per_request: dict[int, int] = {}
        for w in works:
            per_request[w.branch.request.id] = per_request.get(w.branch.request.id, 0) + 1
        steps.append(per_request)
        return works

    llm.scheduler.schedule = spy
    sp = SamplingParams(temperature=0.0, forced_output=TEXT, logprobs=True, serial_branches=serial)
    outs = llm.generate(["q one", "q two"], sp)
    llm.scheduler.schedule = schedule
    return outs, steps


def test_serial_branches_same_output_more_steps(setup):
    tok, hf, ours = setup
    par, par_steps = _run(engine(ours, tok, num_kv_slots=4096), serial=False)
    llm = engine(ours, tok, num_kv_slots=4096)
    ser, ser_steps = _run(llm, serial=True)
    for a, b in zip(par, ser):
        assert a.text == b.text == TEXT
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids and a.forced == b.forced
        assert a.usage.parallel_degree == b.usage.parallel_degree > 1.0
        check_output(hf, tok, b)  # serial decoding keeps the layout rule's logprobs
    assert max(max(s.values(), default=0) for s in ser_steps) == 1  # one branch per request per step
    assert max(max(s.values(), default=0) for s in par_steps) >= 3  # forking on runs siblings together
    assert len(ser_steps) > len(par_steps)
    assert_no_leak(llm)
