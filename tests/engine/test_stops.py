"""Stop strings in a fork/join generation (:mod:`multiverse.engine.stops`), on forced outputs: a
stop in a path ends that path (cut before the stop, closed with ``</Path>\\n``) and the request
goes on to the merge; in the root it ends the request; engine-inserted text never matches; a
tag the model writes can end a match (cut before the tag); the first completed stop wins."""

from __future__ import annotations

import pytest
from _engine_util import assert_no_leak, block, engine

from multiverse.engine import stops
from multiverse.engine.sampling import SamplingParams

TWO = "<Think>\n" + block([("1", "one STOP more"), ("2", "two")], "both") + "</Think>\nAnswer: 7"
LAST = (
    "<Think>\n"
    + block([("1", "one"), ("2", "two"), ("3", "yy ZZ tail")], "all three")
    + "</Think>\nAnswer: 7"
)


@pytest.fixture(scope="module")
def llm(pair, tok):
    return engine(pair[1], tok, num_kv_slots=4096)


def _gen(llm, text, stop):
    out = llm.generate(
        ["q"], SamplingParams(temperature=0.0, max_tokens=600, forced_output=text, stop=stop)
    )[0]
    assert_no_leak(llm)
    return out


def test_a_stop_in_a_path_ends_that_path_and_the_request_goes_on(llm):
    out = _gen(llm, TWO, ["STOP"])
    assert (
        "<Path>\n1: one </Path>\n<Path>\n2: two\n</Path>\n<Conclusion>\nboth\n</Conclusion>"
        in out.text
    )
    assert (
        out.text.endswith("</Think>\nAnswer: 7")
        and "STOP" not in out.text
        and "more" not in out.text
    )
    assert out.usage.blocks == 1


def test_a_stop_in_the_last_path_does_not_end_the_request(llm):
    out = _gen(llm, LAST, ["ZZ"])
    assert "<Path>\n3: yy </Path>\n<Conclusion>\nall three\n</Conclusion>" in out.text
    assert out.text.endswith("Answer: 7")


def test_a_stop_in_the_conclusion_ends_the_request_there(llm):
    out = _gen(llm, LAST, ["three"])
    assert out.text.endswith("<Conclusion>\nall ") and out.finish_reason == "stop"
    assert "3: yy ZZ tail\n</Path>" in out.text


def test_engine_inserted_text_never_matches(llm):
    plain = _gen(llm, TWO, None)
    for stop in (["Path>"], ["<Path>\n2:"], ["Conclusion>\n"], ["</Path>\n<Path>"]):
        assert _gen(llm, TWO, stop).text == plain.text, stop


def test_a_tag_the_model_writes_can_end_a_stop_and_is_not_written(llm):
    out = _gen(llm, TWO, ["</Think>"])  # the root: the request ends before the tag
    assert out.text.endswith("</Conclusion>\n</Parallel>\n") and out.finish_reason == "stop"
    out = _gen(llm, TWO, ["<Goal>"])  # before the fork: nothing forks
    assert out.text == "<Think>\n<Parallel>\n" and out.usage.blocks == 0
    out = _gen(llm, TWO, ["two\n</Path>"])  # in a path: cut before "two", the engine closes it
    assert "<Path>\n2: </Path>\n<Conclusion>\nboth\n" in out.text and out.text.endswith("Answer: 7")
    out = _gen(llm, TWO, ["<Goal>\n<Outline>", "Outline>\n1"])  # a match never spans over a tag
    assert out.text == _gen(llm, TWO, None).text


def test_the_first_completed_stop_wins_and_no_part_of_it_is_left(llm):
    text = "alpha beta STOP gamma"
    out = _gen(llm, text, ["OP", "STOP"])  # both end at the same character: the longer one
    assert out.text == "alpha beta "
    out = _gen(llm, text, ["ta STOP", "STO"])  # "STO" is complete first, though it starts later
    assert out.text == "alpha beta "


def test_a_stop_split_across_tokens_inside_a_path(llm, tok):
    stop = "e STO"
    ids = tok.encode(" one STOP more", add_special_tokens=False)
    assert not any(stop in tok.decode([t]) for t in ids)
    out = _gen(llm, TWO, [stop])
    assert "<Path>\n1: on</Path>\n<Path>\n2: two\n</Path>" in out.text


def test_earliest_stop_and_stop_hold():
    assert stops.earliest_stop("xabcd", ["abcd", "bc"]) == 2  # "bc" is complete first
    assert stops.earliest_stop("xabc", ["abc", "c"]) == 1  # same end: the longer, not a part of it
    assert stops.earliest_stop("xyz", ["q"]) == -1
    assert stops.stop_hold("hello wor", ["world", "or"]) == 3
    assert stops.stop_hold("hello wor", ["world"], limit=2) == 0  # never across the run's start
    assert stops.stop_hold("abc", []) == 0
