"""checks: grammar (zero issues, planned counts), content (edit distance), style."""

import itertools

from multiverse.curate import checks
from multiverse.eval import tasks


def _record():
    return next(iter(tasks.iter_records(0, "train", ["sum_products"])))


def test_a_task_chain_passes_every_check_against_its_sequential_chain():
    for r in itertools.islice(tasks.iter_records(0, "train"), 10):
        from multiverse.format import grammar

        planned = grammar.stats(grammar.parse(r.chain)).paths
        result = checks.run_checks(r.chain, r.sequential_chain, planned)
        assert result.passed, result.reasons
        assert result.distance == 0.0


def test_grammar_reports_issues_and_wrong_counts():
    r = _record()
    broken = r.chain.replace("</Conclusion>\n", "", 1)
    assert checks.check_grammar(broken, [r.num_paths])[0].startswith("grammar: line")
    assert "differ from the plan [9]" in checks.check_grammar(r.chain, [9])[0]


def test_content_threshold():
    r = _record()
    lines = r.chain.split("\n")
    cut = "\n".join(x for x in lines if "Multiply" not in x)
    res = checks.run_checks(cut, r.sequential_chain, [r.num_paths], threshold=0.01)
    assert not res.content and res.distance > 0.01 and "over the threshold 0.01" in res.reasons[-1]
    assert checks.run_checks(cut, r.sequential_chain, [r.num_paths], threshold=0.9).content


def test_style_forbidden_openings_sibling_references_and_empty_parts():
    text = ("<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: \n"
            "</Outline>\n</Goal>\n<Path>\n1: Alternatively, x.\n</Path>\n<Path>\n2: As in path 1, y.\n</Path>\n"
            "<Conclusion>\n\n</Conclusion>\n</Parallel>\n</Think>")  # fmt: skip
    reasons = checks.check_style(text)
    assert any("outline 2 is empty" in x for x in reasons)
    assert any("the conclusion is empty" in x for x in reasons)
    assert any("path 1 opens with 'Alternatively'" in x for x in reasons)
    assert any("path 2 refers to a sibling ('path 1')" in x for x in reasons)
    assert checks.check_style(text.replace("Alternatively, x", "Nextly x").replace("As in path 1, y", "y")
                              .replace("2: \n", "2: b\n").replace("<Conclusion>\n\n", "<Conclusion>\nc\n")) == []
