"""The text format (SPEC 1.2): parse / serialize / validate / read / flatten / tokenizer tags."""

from __future__ import annotations

from pathlib import Path as FsPath

import pytest

from multiverse.format import grammar as g

CANON = """<Think>
First some sequential reasoning.
Let's think in parallel.
<Parallel>
<Goal>
<Outline>
1: compute a
</Outline>
<Outline>
2: compute b
</Outline>
</Goal>
<Path>
1: a is 3.
Let's think in parallel.
<Parallel>
<Goal>
<Outline>
1.1: part x
</Outline>
<Outline>
1.2: part y
</Outline>
</Goal>
<Path>
1.1: x is 1.
</Path>
<Path>
1.2: y is 2.
</Path>
<Conclusion>
x + y = 3.
</Conclusion>
</Parallel>
So a = 3.
</Path>
<Path>
2: b is 4.
</Path>
<Conclusion>
a = 3 and b = 4.
</Conclusion>
</Parallel>
Therefore a + b = 7.
</Think>

Answer: 7"""


def test_parse_tree_and_round_trip():
    doc = g.parse(CANON)
    assert g.serialize(doc) == CANON
    (blk,) = doc.blocks
    assert [o.label for o in blk.outlines] == ["1", "2"]
    assert [o.text for o in blk.outlines] == ["compute a", "compute b"]
    assert [p.label for p in blk.paths] == ["1", "2"]
    assert blk.conclusion == "a = 3 and b = 4."
    nested = blk.paths[0].blocks[0]
    assert [p.label for p in nested.paths] == ["1.1", "1.2"]
    assert doc.answer == "7"
    s = g.stats(doc)
    assert (s.blocks, s.max_depth, s.paths) == (2, 2, [2, 2])
    assert g.validate(CANON) == []


def test_flatten_removes_tags_goals_conclusions_cue_labels():
    assert g.flatten(CANON) == "\n".join([
        "First some sequential reasoning.", "a is 3.", "x is 1.", "y is 2.", "So a = 3.",
        "b is 4.", "Therefore a + b = 7.", "Answer: 7",
    ])  # fmt: skip


def test_serialize_built_tree_is_canonical():
    blk = g.Block(
        outlines=[g.Outline("1", "one"), g.Outline("2", "two")],
        paths=[g.PathNode("1", ["p one\n"]), g.PathNode("2", ["p two\n"])],
        conclusion="both",
    )
    doc = g.Document(body=["\nLet's think in parallel.\n", blk, "\nend\n"], after="\n\nAnswer: 1")
    text = g.serialize(doc)
    assert g.validate(text) == []
    assert g.serialize(g.parse(text)) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CANON.replace("<Outline>\n2: compute b\n</Outline>\n", ""),
         "line 34 col 1: <Path> 2 has no matching <Outline> (Goal has 1)"),
        (CANON.replace("2: b is 4.", "3: b is 4."), "<Path> label 3 does not match <Outline> 2 label 2"),
        (CANON.replace("<Conclusion>\na = 3 and b = 4.\n</Conclusion>\n", ""), "has no <Conclusion>"),
        (CANON.replace("<Goal>\n<Outline>\n1: compute a", "stray words\n<Goal>\n<Outline>\n1: compute a"),
         "line 5 col 1: text outside <Goal>/<Path>/<Conclusion> inside <Parallel>"),
        (CANON.replace("<Path>\n2: b", "<Path>\n2: b <Goal>"), "unexpected <Goal> inside <Path>"),
        (CANON.replace("</Path>\n<Path>\n2:", "</path>\n<Path>\n2:"), "tag </path> is not written exactly as </Path>"),
        (CANON[: CANON.index("1.2: y is 2.")], "text ends inside <Path>"),
        (CANON.replace("2: b is 4.", "2: b is 4.\n</Think>"), "stray </Think> inside a <Path>"),
        (CANON.replace("</Goal>\n<Path>\n1: a", "<Path>\n0: a\n</Path>\n</Goal>\n<Path>\n1: a", 1), "line 12 col 1: <Goal> opened at line 5 col 1 is not closed before <Path>"),
        (CANON + "\n<Parallel>", "<Parallel> after </Think>"),
    ],
)  # fmt: skip
def test_validator_reports_line_col_message(text, expected):
    issues = g.validate(text)
    assert any(expected in str(i) for i in issues), [str(i) for i in issues]
    with pytest.raises(g.MultiverseSyntaxError) as err:
        g.parse(text)
    assert err.value.issues == issues


def test_issue_has_exact_position():
    text = CANON.replace("<Outline>\n2: compute b\n</Outline>\n", "")
    (issue,) = g.validate(text)
    assert (issue.line, issue.col) == (34, 1)
    assert text.splitlines()[issue.line - 1] == "<Path>"


def test_tolerant_reader_on_truncated_output():
    cut = CANON[: CANON.index("1.2: y is 2.") + 9]
    doc, issues = g.read(cut)
    assert issues and not doc.think_closed
    (blk,) = doc.blocks
    assert not blk.closed and len(blk.paths) == 1
    inner = blk.paths[0].blocks[0]
    assert [p.label for p in inner.paths] == ["1.1", "1.2"] and not inner.closed
    assert g.flatten(doc).endswith("y is")


def test_tolerant_reader_lower_case_and_stray_think():
    text = CANON.lower().replace("2: b is 4.", "2: b is 4.\n</think>")
    doc, issues = g.read(text)
    assert any("not written exactly" in i.message for i in issues)
    assert any("stray </Think>" in i.message for i in issues)
    (blk,) = doc.blocks
    assert [p.label for p in blk.paths] == ["1", "2"] and doc.think_closed
    assert doc.answer == "7"


def test_outline_labels_for_engine_fork():
    goal = "<Parallel>\n<Goal>\n<Outline>\n1.1: a\n</Outline>\n<Outline>\nno label\n</Outline>\n</Goal>"
    assert g.outline_labels(goal) == ["1.1", "1.2"]
    assert g.outline_labels("<Goal>\n</Goal>") == []
    assert g.outline_labels("<Outline>\nx\n</Outline><Outline>\ny\n</Outline>") == ["1", "2"]


@pytest.mark.parametrize(
    ("written", "labels"),
    [
        (["2", None], ["2", "3"]),  # issue 28, item 5: ["2", "2"]
        (["2", "2"], ["2", "3"]),
        ([None, "1"], ["1", "2"]),
        (["1", None, "3"], ["1", "2", "3"]),
        (["1.2", "1.2", None], ["1.2", "1.3", "1.4"]),
        (["5", None, "2"], ["5", "6", "2"]),
        (["1.2", "2"], ["1.2", "1.3"]),  # under the prefix 1., a bare 2 is 1.2
        (["1.1", "2"], ["1.1", "2"]),
    ],
)
def test_outline_labels_are_unique_within_a_block(written, labels):
    goal = "".join(f"<Outline>\n{w + ': ' if w else ''}x\n</Outline>\n" for w in written)
    assert g.outline_labels(f"<Parallel>\n<Goal>\n{goal}</Goal>") == labels
    assert g.unique_labels(written) == labels


def test_reader_checks_path_labels_against_the_unique_labels():
    def text(paths: list[str]) -> str:
        body = "".join(f"<Path>\n{p}: y\n</Path>\n" for p in paths)
        goal = "<Outline>\n2: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n"
        return f"<Think>\n<Parallel>\n<Goal>\n{goal}</Goal>\n{body}<Conclusion>\nc\n</Conclusion>\n</Parallel>\n</Think>"

    assert g.validate(text(["2", "3"])) == []  # what the engine writes for outlines 2, 2
    (issue,) = g.validate(text(["2", "2"]))
    assert "label 2 does not match <Outline> 2 label 3 (2 is repeated)" in issue.message


def test_approx_tokens_keeps_tags_whole():
    toks = g.approx_tokens("<Path>\n12: ok.</Path>")
    assert toks == ["<Path>", "\n", "1", "2", ":", "ok", ".", "</Path>"]
    assert g.tag_of("<path>") == "<Path>" and g.tag_of("path") is None


def test_real_traces_never_crash(shared_data: FsPath):
    files = sorted((shared_data / "traces").rglob("*.txt"))
    assert len(files) >= 100
    for f in files:
        text = f.read_text(encoding="utf-8")
        doc, issues = g.read(text)
        for i in issues:
            assert i.line >= 1 and i.col >= 1


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Goal", "/", "Path", "Think", "Parallel", "Outline", "Conclusion", "a", "b", "\n", "<", ">"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(r"(/|<|>|\n| )", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_add_tags_to_tokenizer_and_model():
    transformers = pytest.importorskip("transformers")
    import torch

    tok = _tiny_tokenizer()
    base = len(tok)
    ids = g.add_tags_to_tokenizer(tok)
    assert list(ids) == list(g.TAGS)
    assert list(ids.values()) == list(range(base, base + 12))  # consecutive, in TAGS order
    assert tok.encode("<Path>a</Path>", add_special_tokens=False) == [ids["<Path>"], 7, ids["</Path>"]]
    assert g.add_tags_to_tokenizer(tok) == ids  # idempotent
    cfg = transformers.Qwen2Config(vocab_size=base, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg)
    g.add_tags_to_model(model, tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 64  # len(tokenizer) = 25 rounded up to a multiple of 64
    goal = tok.encode("Goal", add_special_tokens=False)
    slash_path = tok.encode("/Path", add_special_tokens=False)
    assert torch.allclose(emb[ids["<Goal>"]], emb[goal].mean(0))
    assert torch.allclose(emb[ids["</Path>"]], emb[slash_path].mean(0))
    out = model.get_output_embeddings().weight
    assert torch.allclose(out[ids["</Path>"]], out[slash_path].mean(0))


def test_tag_ids_errors():
    tok = _tiny_tokenizer()
    with pytest.raises(ValueError, match="add_tags_to_tokenizer"):
        g.tag_ids(tok)


def test_text_cut_inside_think_after_a_block_reads_as_open():
    """The close of a nested path used to leak into ``think_closed``: a text with a whole block
    and no ``</Think>`` read as closed (inspect said "truncated: no")."""
    text = CANON[: CANON.index("</Think>")] + "more"
    doc, issues = g.read(text)
    assert not doc.think_closed
    assert issues[-1].message.startswith("text ends inside <Think>")


def test_tags_fold_case_in_ascii_only():
    """``<concluſion>`` (long s) and ``<outlıne>`` (dotless i) matched the tag pattern under
    Unicode case folding and then raised KeyError; they are text."""
    for odd in ("<concluſion>", "<outlıne>", "<outlİne>", "<thin\u212a>"):
        doc, issues = g.read(f"<Think>\n{odd}\n</Think>")
        assert doc.body == [f"\n{odd}\n"] and issues == []
