"""Tests for the word-problem tasks (multiverse.eval.word_problems): word_parallel, word_sequential."""

from __future__ import annotations

import random
import re

import pytest

from multiverse.eval import tasks, word_problems
from multiverse.eval.task_plans import Plan, to_record
from multiverse.format import grammar

WORD = ("word_parallel", "word_sequential")
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")


@pytest.fixture(scope="module")
def records() -> dict[str, list[tasks.Record]]:
    return {t: tasks.generate(150, seed=4, split="train", tasks=[t]) for t in WORD}


def _steps(text: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(text)]


def _value(a: int, op: str, b: int) -> int:
    if op == "/":
        assert a % b == 0, (a, b)  # halving only of even numbers
        return a // b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_registered_but_not_in_the_default_mixes():
    assert set(WORD) <= set(tasks.TASKS)
    assert not set(WORD) & set(tasks.DEFAULT_TASKS)
    assert not set(WORD) & set(tasks.EVAL_TASKS)
    assert not set(WORD) & set(tasks.TOKENIZER_TASKS)
    assert {r.task for r in tasks.generate(40, seed=0)} <= set(tasks.DEFAULT_TASKS)


@pytest.mark.parametrize("task", WORD)
def test_chains_valid_and_flatten_to_the_sequential_chain(records, task):
    for rec in records[task]:
        assert grammar.validate(rec.chain) == [], rec.chain
        assert grammar.serialize(grammar.parse(rec.chain)) == rec.chain
        assert grammar.validate(rec.sequential_chain) == []
        assert grammar.flatten(rec.chain) == grammar.flatten(rec.sequential_chain)
        assert "<Parallel>" not in rec.sequential_chain
        assert rec.id.startswith(task + "-") and isinstance(rec.answer, int) and rec.answer >= 0


def _lead(line: str) -> str:
    return line.split(": ", 1)[0]


def test_parallel_kind_is_one_block_of_short_outlines(records):
    for rec in records["word_parallel"]:
        assert rec.structure == "parallel" and rec.depth == 1 and rec.num_paths == word_problems.QUANTITIES == 4
        doc = grammar.parse(rec.chain)
        assert len(doc.blocks) == 1
        blk = doc.blocks[0]
        names = [o.text.strip() for o in blk.outlines]
        assert all(len(n.split()) == 1 and n[0].isupper() for n in names)  # just the quantity's name
        rows = rec.question.splitlines()
        assert rows[0].endswith(" has:") and len(rows) == 2 + len(names)
        values = []
        for name, row, path in zip(names, rows[1:], blk.paths, strict=False):
            text = "".join(x for x in path.body if isinstance(x, str)).strip()
            first, *lines, last = text.splitlines()
            assert first == row and row.startswith(f"{name}: ")  # the path restates its line
            steps = [_steps(line) for line in lines]
            assert all(len(s) == 1 for s in steps) and len(steps) == 1 + word_problems.PATH_STEPS
            steps = [s[0] for s in steps]
            assert steps[0][1] == "*" and _lead(lines[0]) in row
            assert all(s[3] == t[0] for s, t in zip(steps, steps[1:]))  # each step uses the last
            for line in lines[1:]:  # led by the question's words for that step
                assert _lead(line).lower() in row.lower(), (line, row)
            values.append(steps[-1][3])
            assert last == f"{name} = {values[-1]}." and values[-1] in word_problems.COUNTS
        expect = ", ".join(f"{n} = {v}" for n, v in zip(names, values, strict=True))
        assert blk.conclusion.strip() == expect + "."
        after = rec.chain.split("</Parallel>\n", 1)[1].removesuffix("\n</Think>").splitlines()
        total, sums = values[0], []
        for v in values[1:]:
            sums.append(f"{total} + {v} = {total + v}.")
            total += v
        assert after == [*sums, f"In all: {total}."] and rec.answer == total == sum(values)


def test_sequential_kind_has_no_block(records):
    for rec in records["word_sequential"]:
        assert rec.structure == "sequential" and rec.num_paths == 0 and rec.depth == 0
        assert rec.chain == rec.sequential_chain
        assert "<Parallel>" not in rec.chain and grammar.CUE not in rec.chain
        assert grammar.parse(rec.chain).blocks == []
        steps = _steps(rec.chain)
        assert 4 <= len(steps) <= 6 and steps[0][1] == "*"
        assert all(s[3] == t[0] for s, t in zip(steps, steps[1:]))  # dependent: a chain
        assert steps[-1][3] == rec.answer
        for line in rec.chain.splitlines()[1:-1]:  # one step a line, led by the question's words
            assert len(_steps(line)) == 1 and _lead(line).lower() in rec.question.lower(), line


@pytest.mark.parametrize("task", WORD)
def test_no_step_undoes_the_one_before(records, task):
    undo = {"+": "-", "-": "+", "*": "/", "/": "*"}
    for rec in records[task]:
        body = rec.chain.split("<Conclusion>")[0]
        for path in body.split("<Path>")[1:] if task == "word_parallel" else [body]:
            steps = _steps(path)[1:]  # after the product
            for (_, op, b, _), (_, op2, b2, _) in zip(steps, steps[1:]):
                assert (op2, b2) != (undo[op], b), path


@pytest.mark.parametrize("task", WORD)
def test_answers_recomputed_from_the_written_chain(records, task):
    for rec in records[task]:
        steps = _steps(rec.chain)
        for a, op, b, c in steps:
            assert _value(a, op, b) == c, (rec.id, a, op, b, c)
            assert 0 < c < word_problems.LIMIT
        if task == "word_sequential":
            assert steps[-1][3] == rec.answer
        else:
            assert rec.answer in {c for *_, c in steps}
        assert tasks.assistant_text(rec).endswith(f"\n\nAnswer: {rec.answer}")


@pytest.mark.parametrize("task", WORD)
def test_answers_recomputed_from_the_question(records, task):
    """The question alone states the computation: redo it from the words."""
    for rec in records[task][:60]:
        values = []
        one = task == "word_sequential"
        parts = [rec.question] if one else rec.question.splitlines()[1:-1]
        for part in parts:
            m = re.search(r"(\d+) \w+ of (\d+)", part)
            assert m, part
            value = int(m.group(1)) * int(m.group(2))
            for op in re.findall(r"(?:(\b(?:sells|gives out|gives away|lends out|picks)) (\d+)|"
                                 r"(\d+) more|(doubles)|(halves))", part[m.end():]):  # fmt: skip
                if op[0]:
                    value -= int(op[1])
                elif op[2]:
                    value += int(op[2])
                elif op[3]:
                    value *= 2
                else:
                    value //= 2
            values.append(value)
        if task == "word_sequential":
            assert len(values) == 1 and rec.answer == values[0], rec.question
        else:
            assert re.search(r"in all\?$|total\?$", rec.question), rec.question
            assert len(values) == 4 and rec.answer == sum(values), rec.question


def test_deterministic_and_seed_dependent():
    a = [r.to_dict() for r in tasks.generate(30, seed=3, tasks=WORD)]
    assert a == [r.to_dict() for r in tasks.generate(30, seed=3, tasks=WORD)]
    assert a != [r.to_dict() for r in tasks.generate(30, seed=4, tasks=WORD)]
    assert {r["task"] for r in a} == set(WORD)


def test_splits_disjoint_and_space_large_enough():
    for task in WORD:
        train = tasks.generate(1200, seed=0, split="train", tasks=[task])
        test = tasks.generate(200, seed=0, split="test", tasks=[task])
        more_test = tasks.generate(200, seed=1, split="test", tasks=[task])
        assert len({r.question for r in train}) == 1200 and len({r.question for r in test}) == 200
        assert not {r.question for r in train} & {r.question for r in test + more_test}
        assert all(tasks.split_of(tasks.problem_key(task, r.question)) == "test" for r in test)


def test_numbers_stay_small(records):
    """Every product is from the times table (2-9 by 2-12), every other step (the Reduce's
    additions included) doubles, halves or adds or takes away 10-50."""
    for task in WORD:
        for rec in records[task]:
            for line in rec.chain.splitlines():
                for a, op, b, c in _steps(line):
                    if " of " in _lead(line):
                        assert op == "*" and 2 <= a <= 9 and 2 <= b <= 12, line
                    else:
                        assert (op in "*/" and b == 2) or (op in "+-" and b in (10, 20, 30, 40, 50)), line
                    assert 0 < c < word_problems.LIMIT


def test_to_record_without_a_block():
    rec = to_record(Plan(task="t", question="q?", body=["1 + 1 = 2."], answer=2))
    assert rec.chain == rec.sequential_chain == "<Think>\n1 + 1 = 2.\n</Think>"
    assert (rec.num_paths, rec.depth, rec.structure) == (0, 0, "sequential")
    assert rec.to_dict()["structure"] == "sequential"


def test_records_round_trip_with_structure(tmp_path):
    recs = tasks.generate(4, seed=0, tasks=WORD)
    path = tmp_path / "w.jsonl"
    tasks.write_jsonl(path, recs)
    assert tasks.read_jsonl(path) == recs
    old = tasks.Record(**{k: v for k, v in recs[0].to_dict().items() if k != "structure"})
    assert old.structure == "parallel"  # records written before the field: all had a block


def test_a_hand_checked_draw():
    rec = to_record(word_problems.WORD_TASKS["word_sequential"](random.Random(0)))
    lines = rec.chain.splitlines()[1:-1]
    m = re.match(r"(\w+) has (\d+) (\w+) of (\d+) (\w+)\. ", rec.question)
    assert m and lines[0] == f"{m[2]} {m[3]} of {m[4]} {m[5]}: {m[2]} * {m[4]} = {int(m[2]) * int(m[4])}."
    assert rec.question.endswith(f"How many {m[5]} does {m[1]} have now?")
