"""plan validators, skeleton + refill (property: nothing dropped or re-typed), the edit applier."""

import itertools
import random

import pytest
from curate_standin import Derived

from multiverse.curate import plan, refill, skeleton, validate
from multiverse.curate import units as U
from multiverse.eval import tasks
from multiverse.format import grammar


def _random_plan(rng: random.Random, n: int) -> tuple[list[plan.Step], list[plan.Group]]:
    cuts = sorted(rng.sample(range(2, n + 1), rng.randint(0, min(n - 1, 6))))
    bounds = [1, *cuts, n + 1]
    steps = []
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1] - 1
        subs = []
        if b > a and rng.random() < 0.5:
            inner = sorted(rng.sample(range(a + 1, b + 1), rng.randint(1, b - a)))
            ib = [a, *inner, b + 1]
            subs = [plan.Step(f"{k + 1}.{j + 1}", ib[j], ib[j + 1] - 1, "s") for j in range(len(ib) - 1)]
        steps.append(plan.Step(str(k + 1), a, b, "s", subs))
    groups = []

    def pick(ids: list[str]) -> None:
        k = 0
        while k < len(ids) - 1:
            if rng.random() < 0.5:
                size = rng.randint(2, len(ids) - k)
                groups.append(plan.Group(ids[k : k + size], "r"))
                k += size
            else:
                k += 1

    pick([s.id for s in steps])
    for s in steps:
        pick([x.id for x in s.substeps])
    return steps, groups


def test_random_plans_refill_every_unit_once_and_flatten_to_the_chain_property():
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(1, 14)
        lines = [f"line {k} {'x ' * rng.randint(0, 3)}".strip() for k in range(1, n + 1)]
        units = U.split_units("\n".join(lines))
        steps, groups = _random_plan(rng, n)
        assert validate.validate_steps(steps, n) == []
        assert validate.validate_groups(groups, steps) == []
        items = skeleton.build(steps, groups)
        assert skeleton.unit_order(items) == list(range(1, n + 1))
        for _, blk in skeleton.iter_blocks(items):
            blk.outlines = [f"goal {k}" for k in range(len(blk.paths))]
            blk.conclusion = "done"
        text = refill.render(items, units)
        assert grammar.validate(text) == []
        assert grammar.flatten(text) == U.join(units)
        assert grammar.stats(grammar.parse(text)).paths == skeleton.paths_per_block(items)


def test_sentence_units_split_across_paths_only_gain_line_breaks():
    units = U.split_units("A one. B two. C three.", max_chars=5)
    steps = [plan.Step("1", 1, 1, ""), plan.Step("2", 2, 3, "")]
    items = skeleton.build(steps, [plan.Group(["1", "2"])])
    text = refill.render(items, units)
    assert grammar.flatten(text) == "A one.\nB two. C three."


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_task_records_rebuild_exactly_from_their_derived_plan(task):
    for r in itertools.islice(tasks.iter_records(0, "train", [task]), 5):
        d = Derived(r.chain)
        units = U.split_units(U.normalise(r.chain))
        steps, errors = validate.parse_reply("summarise", _json({"steps": d.steps}), num_units=len(units))
        assert errors == []
        groups, errors = validate.parse_reply("parallelise", _json({"groups": d.groups}), steps=steps)
        assert errors == []
        items = skeleton.build(steps, groups)
        texts = {u.index: u.text for u in units}
        for _, blk in skeleton.iter_blocks(items):
            paths = [refill.render_container(p.items, texts, {u.index: u.sep for u in units}, "9.") for p in blk.paths]
            reply = d.blocks[tuple(grammar.flatten(p) for p in paths)]
            blk.outlines, blk.conclusion = reply["outlines"], reply["conclusion"]
        assert refill.render(items, units) == r.chain


def _json(obj):
    import json

    return json.dumps(obj)


def test_step_validator_messages_are_precise():
    s = [plan.Step("1", 1, 2, ""), plan.Step("2", 4, 5, "", [plan.Step("2.1", 4, 4, ""), plan.Step("2.2", 6, 6, "")])]
    errors = validate.validate_steps(s, 7)
    assert "top-level steps: units 3..3 are in no step (before step 2)" in errors
    assert "top-level steps: units 6..7 are in no step (after the last step)" in errors
    assert any("2.2 reach outside their parent step 2" in e for e in errors)
    overlap = validate.validate_steps([plan.Step("1", 1, 3, ""), plan.Step("2", 3, 4, "")], 4)
    assert overlap == ["top-level steps: step 2 starts at unit 3, overlapping the previous step (next free unit is 4)"]
    _, errors = validate.parse_reply("summarise", '{"steps": [{"id": "1", "units": [1], "summary": ""}]}', num_units=1)
    assert "'units' must be [first, last]" in errors[0]
    deep = '{"steps": [{"id": "1", "units": [1, 1], "substeps": [{"id": "1.1", "units": [1, 1], "substeps": [{"id": "x", "units": [1, 1]}]}]}]}'
    assert "two levels at most" in validate.parse_reply("summarise", deep, num_units=1)[1][0]


def test_group_validator_messages():
    steps = [plan.Step("1", 1, 1, ""), plan.Step("2", 2, 3, "", [plan.Step("2.1", 2, 2, ""), plan.Step("2.2", 3, 3, "")]),
             plan.Step("3", 4, 4, "")]  # fmt: skip
    assert validate.validate_groups([plan.Group(["1", "3"])], steps) == ["group 1 (1, 3): the steps are not adjacent and in order"]
    assert "not siblings" in validate.validate_groups([plan.Group(["1", "2.1"])], steps)[0]
    assert "at least two" in validate.validate_groups([plan.Group(["1"])], steps)[0]
    assert "unknown step id(s) 9" in validate.validate_groups([plan.Group(["1", "9"])], steps)[0]
    twice = validate.validate_groups([plan.Group(["1", "2"]), plan.Group(["2", "3"])], steps)
    assert twice == ["group 2 (2, 3): step 2 is already in group 1"]
    assert validate.validate_groups([plan.Group(["2.1", "2.2"]), plan.Group(["1", "2"])], steps) == []


def test_block_text_validator_and_json_extraction():
    reply = plan.BlockText(["a"], "", [plan.Edit(3, "", "")])
    errors = validate.validate_block_text(reply, 2)
    assert errors[0].startswith("the block has 2 paths but the reply gives 1 outlines")
    assert "the conclusion is empty" in errors and any("path 3 does not exist" in e for e in errors)
    assert validate.extract_json('Here:\n```json\n{"a": 1}\n```') == {"a": 1}
    assert validate.extract_json('ok {"a": [1]} bye') == {"a": [1]}
    with pytest.raises(plan.PlanError, match="not valid JSON"):
        validate.extract_json("{nope")


def test_edit_applies_only_where_find_occurs_exactly_once():
    units = U.split_units("intro\nAlternatively, x = 1.\nx = 1. x = 1.\nNext y.")
    blk = skeleton.SkBlock(paths=[skeleton.SkPath([2]), skeleton.SkPath([3]), skeleton.SkPath([4])])
    texts = {u.index: u.text for u in units}
    results = refill.apply_edits(blk, [
        plan.Edit(1, "Alternatively, x", "X"), plan.Edit(2, "x = 1.", "z"), plan.Edit(3, "absent", "q"),
        plan.Edit(3, "Next y", "Y"), plan.Edit(4, "a", "b"),
    ], texts)  # fmt: skip
    assert [r.applied for r in results] == [True, False, False, True, False]
    assert "found 2 times in path 2" in results[1].reason and "not found in path 3" in results[2].reason
    assert texts[2] == "X = 1." and texts[3] == "x = 1. x = 1." and texts[4] == "Y."
    assert refill.outline_text("1.2: sum  of A", "1.2") == "sum of A"


def test_v2_steps_and_groups_are_arrays_ids_by_position_outlines_default_to_the_summaries():
    reply = '{"steps": [[1, 2, "setup"], [3, 6, "cases", [[3, 4, "case a"], [5, 6, "case b"]]]]}'
    steps, errors = validate.parse_reply("summarise", reply, num_units=6)
    assert errors == [] and [s.id for s in steps] == ["1", "2"] and [s.id for s in steps[1].substeps] == ["2.1", "2.2"]
    assert (steps[1].substeps[1].start, steps[1].substeps[1].end, steps[1].substeps[1].summary) == (5, 6, "case b")
    _, errors = validate.parse_reply("summarise", '{"steps": [[1, 6]]}', num_units=6)
    assert "a step is [first, last" in errors[0]
    groups, errors = validate.parse_reply("parallelise", '{"groups": [["2.1", "2.2"]]}', steps=steps)
    assert errors == [] and groups[0].steps == ["2.1", "2.2"]
    _, errors = validate.parse_reply("parallelise", '{"groups": [["1", "2.1"]]}', steps=steps)
    assert "not siblings" in errors[0]
    block, errors = validate.parse_reply("mapreduce", '{"conclusion": "both", "edits": []}', num_paths=2,
                                         outlines=["case a", "case b"])  # fmt: skip
    assert errors == [] and block.outlines == ["case a", "case b"]
    block, errors = validate.parse_reply("mapreduce", '{"conclusion": "c", "outlines": ["x", "y"]}', num_paths=2,
                                         outlines=["case a", "case b"])  # fmt: skip
    assert block.outlines == ["x", "y"]
    _, errors = validate.parse_reply("mapreduce", '{"conclusion": "c"}', num_paths=2, outlines=["case a", ""])
    assert errors == ["outline 2 is empty"]
    _, errors = validate.parse_reply("mapreduce", '{"conclusion": "c"}', num_paths=2)  # no summaries given (v1)
    assert "needs a list 'outlines'" in errors[0]
