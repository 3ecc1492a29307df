"""Tests for the synthetic MapReduce task family (multiverse.eval.tasks)."""

from __future__ import annotations

import json
import re

import pytest

from multiverse.eval import tasks
from multiverse.eval.tasks import Record, generate
from multiverse.format import grammar

N = 120
LONG = ("wide_max", "countdown", "countdown_warmup")
"""Tasks built for a high # parallel (long paths), tested apart."""


@pytest.fixture(scope="module")
def train() -> list[Record]:
    return generate(N, seed=7, split="train")


@pytest.fixture(scope="module")
def test_split() -> list[Record]:
    return generate(N, seed=7, split="test")


def test_chains_are_valid_multiverse_text(train, test_split):
    for rec in train + test_split:
        assert grammar.validate(rec.chain) == [], (rec.id, rec.chain)
        assert grammar.serialize(grammar.parse(rec.chain)) == rec.chain  # canonical layout
        assert grammar.validate(rec.sequential_chain) == []
        assert "<Parallel>" not in rec.sequential_chain


def test_flatten_equals_sequential_chain(train):
    for rec in train:
        flat = grammar.flatten(rec.chain)
        assert flat == grammar.flatten(rec.sequential_chain)
        inner = rec.sequential_chain.removeprefix("<Think>\n").removesuffix("\n</Think>")
        assert flat.split() == inner.split()


def test_structure_fields(train):
    for rec in train:
        doc = grammar.parse(rec.chain)
        st = grammar.stats(doc)
        assert st.max_depth == rec.depth
        assert rec.num_paths == st.paths[0]
        assert all(2 <= p <= 6 for p in st.paths), st.paths
        assert rec.chain.startswith("<Think>\n") and rec.chain.endswith("\n</Think>")
        assert rec.id.startswith(rec.task + "-")
    depths = {r.depth for r in train}
    assert depths == {1, 2}
    assert {r.task for r in train} == set(tasks.DEFAULT_TASKS)
    assert max(r.num_paths for r in generate(60, 1, tasks=["vowel_sum"])) == 6


def test_uneven_paths_exist(train):
    uneven = 0
    for rec in train:
        blk = grammar.parse(rec.chain).blocks[0]
        lengths = {len(_path_text(p).split()) for p in blk.paths}
        uneven += len(lengths) > 1
    assert uneven > N // 2


def _path_text(path: grammar.PathNode) -> str:
    return "".join(x if isinstance(x, str) else grammar.serialize_block(x) for x in path.body)


def test_answers_recomputed_from_question():
    """Each answer recomputed by hand-written logic from the question text alone."""
    for rec in generate(80, seed=3):
        q = rec.question
        if rec.task == "sum_products":
            pairs = [tuple(map(int, m)) for m in re.findall(r"\((\d+), (\d+)\)", q)]
            expect = sum(a * b for a, b in pairs)
        elif rec.task == "max_total":
            lists = re.findall(r"[A-F]: ([\d, ]+)\.", q)
            expect = max(sum(int(x) for x in item.split(", ")) for item in lists)
        elif rec.task == "wide_max":
            lists = re.findall(r"List \d+: ([\d, ]+)\.", q)
            assert 4 <= len(lists) <= 6
            expect = max(sum(int(x) for x in item.split(", ")) for item in lists)
        elif rec.task in ("countdown", "countdown_warmup"):
            d = int(re.match(r"Count down by (\d+) from ", q).group(1))
            starts = [int(x) for x in re.findall(r"\b[r-w] (\d+)", q)]
            assert len(starts) == 6
            expect = sum(x % d for x in starts)
        elif rec.task == "vowel_sum":
            words = q.split(": ", 1)[1].rstrip(".").split(", ")
            expect = sum(ch in "aeiou" for w in words for ch in w)
        else:
            groups = re.findall(r"[A-F]: ((?:\(\d+, \d+\)(?:, )?)+)\.", q)
            expect = max(
                sum(int(a) * int(b) for a, b in re.findall(r"\((\d+), (\d+)\)", g)) for g in groups
            )
        assert rec.answer == expect, (rec.task, q, rec.answer, expect)
        # the chain ends with the answer
        last = grammar.flatten(rec.chain).splitlines()[-1]
        assert last.endswith(f"{rec.answer}."), (last, rec.answer)


def test_arithmetic_in_chains_is_correct(train):
    checked = 0
    for rec in train:
        # "a op b = c" not followed by "+ ...": a complete step
        for a, op, b, c in re.findall(r"(\d+) ([+*]) (\d+) = (\d+)\b(?! \+)", rec.chain):
            value = int(a) + int(b) if op == "+" else int(a) * int(b)
            assert value == int(c), (rec.id, a, op, b, c)
            checked += 1
        # "a * b = x + y = c": a times tens, a times ones
        for a, b, x, y, c in re.findall(r"(\d+) \* (\d+) = (\d+) \+ (\d+) = (\d+)", rec.chain):
            a, b, x, y, c = map(int, (a, b, x, y, c))
            assert (x, y, c) == (a * (b - b % 10), a * (b % 10), a * b), rec.id
            checked += 1
    assert checked > 3 * N


def test_hand_checked_example():
    from multiverse.eval import task_families, task_plans

    rec = task_plans.to_record(task_families._sum_products(__import__("random").Random(0)))
    # every product line is a*b; the last line is the running sum of the products
    products = [int(m) for m in re.findall(r"= (\d+)\.\n</Path>", rec.chain)]
    assert rec.answer == sum(products)
    assert rec.chain.count("<Path>") == rec.num_paths == len(products)


def test_deterministic_and_seed_dependent():
    a = [r.to_dict() for r in generate(30, seed=11)]
    b = [r.to_dict() for r in generate(30, seed=11)]
    c = [r.to_dict() for r in generate(30, seed=12)]
    assert a == b
    assert a != c


def test_splits_disjoint_by_construction(train, test_split):
    train_q = {r.question for r in train} | {r.question for r in generate(N, seed=8)}
    test_q = {r.question for r in test_split} | {r.question for r in generate(N, 9, "test")}
    assert not train_q & test_q
    assert len({r.id for r in train}) == len(train)  # distinct problems within a call
    for rec in test_split:
        assert tasks.split_of(tasks.problem_key(rec.task, rec.question)) == "test"
    for rec in train:
        assert tasks.split_of(tasks.problem_key(rec.task, rec.question)) == "train"


def test_prompt_and_answer_text(train):
    rec = train[0]
    assert tasks.user_text(rec).endswith(" Think step by step and in parallel before answering.")
    assert tasks.user_text(rec, parallel=False).endswith(" Think step by step before answering.")
    full = tasks.assistant_text(rec)
    assert full == rec.chain + "\n\nAnswer: " + str(rec.answer)
    assert grammar.parse(full).answer == str(rec.answer)
    assert tasks.assistant_text(rec, parallel=False).startswith(rec.sequential_chain)


def test_chain_lengths_with_project_tokenizer(train):
    from multiverse.train.bpe import default_tokenizer

    tok = default_tokenizer()
    lengths = [len(tok.encode(tasks.assistant_text(r))) for r in train if r.task not in LONG]
    assert min(lengths) >= 60
    assert sum(lengths) / len(lengths) <= 220
    assert max(lengths) <= 320
    wide = [len(tok.encode(tasks.assistant_text(r))) for r in tasks.generate(40, seed=5, tasks=["wide_max"])]
    assert 250 <= min(wide) and max(wide) <= 700


@pytest.mark.parametrize("task, mean_at_least, min_above", [("wide_max", 2.0, 1.5), ("countdown", 2.5, 2.2)])
def test_long_path_tasks_have_high_parallelism(task, mean_at_least, min_above):
    """The reference chains of the long-path tasks reach a high # parallel (layout rule)."""
    from multiverse.format.layout import layout
    from multiverse.train.bpe import default_tokenizer

    tok = default_tokenizer()
    tag_ids = grammar.tag_ids(tok)
    degrees = [
        layout(tok.encode(tasks.assistant_text(r)), tag_ids).parallel_degree(0)
        for r in tasks.generate(60, seed=7, split="test", tasks=[task])
    ]
    assert sum(degrees) / len(degrees) >= mean_at_least and min(degrees) > min_above


@pytest.mark.parametrize("task, low, high", [("countdown", 50, 99), ("countdown_warmup", 10, 39)])
def test_countdown_paths_follow_the_rule(task, low, high):
    """Each countdown path is its counter, the start from the question, then steps of -d down
    to start mod d; the Conclusion lists those ends in path order."""
    for rec in tasks.generate(40, seed=2, tasks=[task]):
        d = int(re.match(r"Count down by (\d+) from ", rec.question).group(1))
        starts = dict(re.findall(r"\b([r-w]) (\d+)", rec.question))
        assert all(low <= int(x) <= high for x in starts.values())
        blk = grammar.parse(rec.chain).blocks[0]
        assert [o.text.strip() for o in blk.outlines] == list(tasks.COUNTERS)
        ends = []
        for k, path in enumerate(blk.paths):
            dash, key, *numbers = _path_text(path).rstrip(".\n").split()
            assert path.label == str(k + 1) and dash == "-" and key == tasks.COUNTERS[k]
            values = list(map(int, numbers))
            assert values[0] == int(starts[key]) and 0 <= values[-1] < d
            assert all(a - b == d for a, b in zip(values, values[1:]))
            ends.append(values[-1])
        assert blk.conclusion.strip() == f"Ends: {', '.join(map(str, ends))}."
        assert rec.answer == sum(ends)


def test_jsonl_round_trip(train, tmp_path):
    path = tmp_path / "sub" / "train.jsonl"
    assert tasks.write_jsonl(path, train[:5]) == 5
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(rows[0]) == {
        "id", "question", "chain", "sequential_chain", "answer", "task", "num_paths", "depth", "structure",
    }  # fmt: skip
    assert isinstance(rows[0]["answer"], int)
    assert tasks.read_jsonl(path) == train[:5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        tasks.read_jsonl(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate(1, split="dev")
    with pytest.raises(ValueError, match="unknown task"):
        generate(1, tasks=["nope"])
    with pytest.raises(ValueError, match="n must be"):
        generate(-1)


def test_module_main_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert tasks.main([str(out), "--n", "7", "--split", "test", "--tasks", "vowel_sum"]) == 0
    recs = tasks.read_jsonl(out)
    assert len(recs) == 7 and {r.task for r in recs} == {"vowel_sum"}
    assert recs == generate(7, 0, "test", ["vowel_sum"])
