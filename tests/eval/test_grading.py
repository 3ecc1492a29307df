"""Tests for answer extraction and grading (multiverse.eval.grading), hand-written cases."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from multiverse.eval.grading import (
    boxed_contents,
    extract_answer,
    extract_choice,
    grade,
    math_equal,
    to_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{294}.", "294"),
        ("\\boxed{\\frac{1}{2}} and later \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("x = \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{} then \\boxed{7}\n\\boxed{}", "7"),
        ("The final answer is 204 minutes.", "204 minutes"),
        ("the final answer is \\(\\boxed{204}\\)", "204"),
        ("so the final answer is: $\\frac{3}{5}$.", "\\frac{3}{5}"),
        ("blah\n\nAnswer: 42", "42"),
        ("blah\nanswer: **17**", "17"),
        ("**Final Answer**\n\\boxed{129}", "129"),
        ("Final Answer:\n$12$", "12"),
        ("no answer here, truncated at 37", None),
        ("", None),
        ("\\fbox{5}", "5"),
        ("\\boxed 5$", "5"),
        ("\\boxed{unclosed {x}", "unclosed {x}"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_prefers_text_after_think():
    text = "<Think>\nmaybe \\boxed{12}\n</Think>\n\nAnswer: 13"
    assert extract_answer(text) == "13"
    lower = "<think>\n\\boxed{12}\n</think>\n\nanswer: the value is \\boxed{13}"
    assert extract_answer(lower) == "13"
    # nothing after </Think>: fall back to the reasoning
    assert extract_answer("<Think>\n\\boxed{12}\n</Think>\n") == "12"


def test_boxed_contents_nested():
    assert boxed_contents("\\boxed{a{b{c}}d} \\boxed{\\{1,2\\}}") == ["a{b{c}}d", "\\{1,2\\}"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", Fraction(42)),
        ("-3.50", Fraction(-7, 2)),
        ("1,234", Fraction(1234)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac34", Fraction(3, 4)),
        ("-\\frac{1}{2}", Fraction(-1, 2)),
        ("1\\frac{4}{5}", Fraction(9, 5)),
        ("90^\\circ", Fraction(90)),
        ("204 \\text{ minutes}", Fraction(204)),
        ("x = 5", Fraction(5)),
        (".35625", Fraction(35625, 100000)),
        ("2k", None),
        ("\\sqrt{2}", None),
        ("1/0", None),
    ],
)
def test_to_number(text, value):
    assert to_number(text) == value


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("\\boxed{294}", "294"),
        ("294.0", "294"),
        ("The final answer is 294.", "294"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
        ("Answer: 1.5", "\\frac{3}{2}"),
        ("\\boxed{-35/9}", "-\\frac{35}{9}"),
        ("\\boxed{90}", "90^\\circ"),
        ("\\boxed{58500}", "58,500"),
        ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\text{Even}}", "\\text{even}"),
        ("\\boxed{1+x+x^2}", "x^2 + x + 1"),
        ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}"),
        ("\\boxed{12 \\pi}", "12\\pi"),
    ],
)
def test_math_equal_cases(prediction, reference):
    assert grade(prediction, reference, "math")


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("\\boxed{295}", "294"),
        ("\\boxed{0.333}", "\\frac{1}{3}"),
        ("\\boxed{2k}", "2"),
        ("\\boxed{x^2 + 1}", "x^2 + x + 1"),
        ("no final answer, 294 appears in passing", "294"),
        ("", "5"),
    ],
)
def test_math_unequal_cases(prediction, reference):
    assert not grade(prediction, reference, "math")


def test_math_equal_without_math_verify(monkeypatch):
    import multiverse.eval.grading as g

    monkeypatch.setattr(g, "_math_verify", lambda a, b: None)
    assert math_equal("294.0", "294")
    assert math_equal("\\dfrac{1}{2}", "0.5")
    assert not math_equal("\\sqrt{12}", "2\\sqrt{3}")  # needs math-verify


@pytest.mark.parametrize(
    ("prediction", "reference", "ok"),
    [
        ("\\boxed{C}", "C", True),
        ("blah\n\nAnswer: (c)", "C", True),
        ("The final answer is \\text{(B)}.", "B", True),
        ("Answer: B) 10^-8 eV", "B", True),
        ("the answer is option (D)\nAnswer: option (D)", "D", True),
        ("\\boxed{A}", "C", False),
        ("I think it is C but not sure", "C", False),  # no explicit answer
    ],
)
def test_choice(prediction, reference, ok):
    assert grade(prediction, reference, "choice") is ok


def test_extract_choice_letter_only():
    assert extract_choice("C") == "C"
    assert extract_choice("a long sentence") is None


def test_exact():
    assert grade("<Think>\n3 + 4 = 7.\n</Think>\n\nAnswer: 7", "7", "exact")
    assert grade("Answer: 7.", 7, "exact")
    assert not grade("Answer: 7.0", "7", "exact")
    assert not grade("Answer: 17", "7", "exact")


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown grading kind"):
        grade("x", "y", "fuzzy")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("294.0", "294.0"),
        ("  $\\frac{1}{2}$ ", "\\frac{1}{2}"),
        ("x = 5", "x = 5"),
        ("cut off here", None),
    ],
)
def test_bare_answers(text, expected):
    assert extract_answer(text) == expected


def test_prose_answer_line_yields_to_boxed_in_reasoning():
    text = (
        "<Think>\nso the answer is 721.\n**Final Answer**\n\\boxed{721}\n</Think>\n\n"
        "Answer: Given the set of rectangular boxes with surface area 54 and volume 23, we "
        "need to find the radius of the smallest sphere that can contain each of these boxes"
    )
    assert extract_answer(text) == "721"
    assert grade(text, "721")
    # a short Answer: line after </Think> still wins over the reasoning
    assert extract_answer("<Think>\n\\boxed{3}\n</Think>\n\nAnswer: 4") == "4"
    # prose is the last resort when nothing else exists
    prose = "Answer: " + "a long explanation without any final value " * 3
    assert extract_answer(prose) == prose[len("Answer: ") :].strip()


def test_math_reference_that_is_a_letter():
    assert grade("\\boxed{(C) Plane}", "\\text{(c)}", "math")
    assert not grade("\\boxed{(A) Line}", "\\text{(c)}", "math")


# ----------------------------------------------------------------------------- grade-traces

TRACE = """问题: What is 6 * 7?

模型解答: <|im_start|>system
Provide the final answer in a fixed format: "the final answer is ..."<|im_end|>
<|im_start|>user
Solve the following math problem: What is 6 * 7?<|im_end|>
<|im_start|>assistant
<Think>
Let's think in parallel.
<Parallel>
<Goal>
<Outline>
1: 6 * 7
</Outline>
<Outline>
2: check
</Outline>
</Goal>
<Path>
1: 6 * 7 = 42
</Path>
<Path>
2: 7 * 6 = 42
</Path>
<Conclusion>
42
</Conclusion>
</Parallel>
</Think>

Answer: the final answer is \\boxed{{{answer}}}

提取的答案: ..."
the final answer is ...

参考答案: 42

是否正确: 否
"""


def _write_traces(root, answers):
    for k, ans in enumerate(answers, 1):
        (root / f"entry_{k}.txt").write_text(TRACE.replace("{{{answer}}}", "{" + ans + "}"))


def test_parse_and_grade_trace(tmp_path):
    from multiverse.eval.structure import TokenCounter
    from multiverse.eval.traces import grade_trace, parse_trace

    _write_traces(tmp_path, ["42.0"])
    trace = parse_trace(tmp_path / "entry_1.txt")
    assert trace.question == "What is 6 * 7?"
    assert trace.reference == "42"
    assert trace.stored_verdict is False
    assert trace.sequence.startswith("<|im_start|>system")
    rec = grade_trace(trace, TokenCounter())
    assert rec["correct"] is True  # the prompt's "the final answer is ..." is not graded
    assert rec["extracted"] == "42.0"
    assert rec["blocks"] == 1 and rec["parallel_degree"] > 1.0


def test_grade_traces_cli(tmp_path, capsys):
    from multiverse import cli

    (tmp_path / "setA").mkdir()
    (tmp_path / "setB").mkdir()
    _write_traces(tmp_path / "setA", ["42", "41"])
    _write_traces(tmp_path / "setB", ["\\frac{84}{2}"])
    assert cli.main(["grade-traces", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    sets = {s["set"]: s for s in out["sets"]}
    assert sets["setA"]["n"] == 2 and sets["setA"]["accuracy"] == 0.5
    assert sets["setA"]["stored_accuracy"] == 0.0
    assert sets["setB"]["accuracy"] == 1.0
    assert sets["setA"]["trigger_rate"] == 1.0
    assert out["total"]["n"] == 3 and out["total"]["correct"] == 2
    assert cli.main(["grade-traces", str(tmp_path)]) == 0
    assert "| setA | 2 | 50.0% (1)" in capsys.readouterr().out
    assert cli.main(["grade-traces", str(tmp_path / "missing")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_text("not a trace")
    assert cli.main(["grade-traces", str(tmp_path / "bad")]) == 2
    assert "not a trace file" in capsys.readouterr().err


def test_grade_real_traces(shared_data):
    """The released traces: the stored verdicts say 0 right; the real grader finds many."""
    from multiverse.eval.structure import TokenCounter
    from multiverse.eval.traces import grade_dir, parse_trace

    root = shared_data / "traces" / "multiverse-32b"
    trace = parse_trace(root / "aime24" / "entry_1.txt")
    assert trace.reference == "204" and trace.stored_verdict is False
    result = grade_dir(root, TokenCounter())
    sets = {s["set"]: s for s in result["sets"]}
    assert sets["aime24"]["n"] == 30 and sets["math500"]["n"] == 109
    assert sets["aime24"]["stored_correct"] == 0
    by_file = {x["file"]: x for x in sets["aime24"]["samples"]}
    assert by_file["entry_1.txt"]["correct"]  # \\boxed{204} after </Think>
    assert by_file["entry_16.txt"]["correct"]  # 73 vs reference 073
    assert by_file["entry_2.txt"]["extracted"] is None  # cut at the length limit
    assert sets["math500"]["accuracy"] > 0.5
    assert 0 < sets["math500"]["trigger_rate"] < 1
    assert sets["math500"]["parallel_degree"] > 1.0


def test_chat_markers_left_by_the_decoder():
    assert extract_answer("<Think>\nx\n</Think>\n\nAnswer: 42<|im_end|>") == "42"
    assert grade("Answer: 42<|endoftext|><|endoftext|>", "42", "exact")
    assert extract_answer("7<|im_end|>") == "7"
