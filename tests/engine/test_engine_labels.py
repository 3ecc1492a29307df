"""Outline labels at a fork (SPEC 4): labels are unique within a block, a repeated or missing
label takes the next number not used, so sibling paths never share a label, a seed or a name.
Tiny random Qwen2, CPU, forced outputs, invariants after every step."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, check_output, engine  # noqa: E402

from multiverse import SamplingParams, grammar  # noqa: E402
from multiverse.engine.request import Status  # noqa: E402


def _block(outlines: list[str], paths: list[str]) -> str:
    goal = "".join(f"<Outline>\n{o}\n</Outline>\n" for o in outlines)
    body = "".join(f"<Path>\n{p}\n</Path>\n" for p in paths)
    return f"<Think>\n<Parallel>\n<Goal>\n{goal}</Goal>\n{body}<Conclusion>\nc\n</Conclusion>\n</Parallel>\n</Think>"


@pytest.mark.parametrize(
    ("outlines", "labels"),
    [
        (["2: a", "b"], ["2", "3"]),  # issue 28, item 5: it gave ["2", "2"]
        (["2: a", "2: b", "c"], ["2", "3", "4"]),
        (["a", "1: b"], ["1", "2"]),
        (["1: a", "b", "3: c"], ["1", "2", "3"]),
    ],
)
def test_repeated_or_missing_labels_fork_distinct_paths(pair, tok, outlines, labels):
    text = _block(outlines, [f"{lab}: p{k}" for k, lab in enumerate(labels)])
    llm = engine(pair[1], tok, num_kv_slots=1024)
    req = llm.add_request(
        "q?", SamplingParams(temperature=1.0, max_tokens=400, forced_output=text, logprobs=True)
    )
    kids = []
    while llm.has_unfinished():
        llm.step()
        if req.root.children and not kids:
            kids = list(req.root.children)
    assert req.root.status is Status.FINISHED and [c.label for c in kids] == labels
    assert len({c.seed for c in kids}) == len(labels)  # each path draws its own numbers
    assert len({c.path_label() for c in kids}) == len(labels)  # and is named apart in a stream
    out = llm.output(req)
    assert out.text == text  # the engine wrote <Path>\n{label}: with the unique labels
    assert [p["label"] for p in out.tree["blocks"][0]["paths"]] == labels
    check_output(pair[0], tok, out)
    assert_no_leak(llm)
    doc, issues = grammar.read(text)  # the reader applies the same rule: no label mismatch
    assert not [i for i in issues if "label" in i.message]
