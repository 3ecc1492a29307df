"""Trainer data, batches, masks and the loss (multiverse.train), on tiny random Qwen2 models.

The loss is checked against an independent computation: the transformers model run once over
the whole sequence with ``attention.positions_and_mask`` (4-D additive mask, eager attention)
and the mean NLL of the assistant tokens taken by hand.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from multiverse.eval import tasks
from multiverse.format import grammar
from multiverse.format import layout as attention
from multiverse.train import data as D
from multiverse.train.bpe import default_tokenizer
from multiverse.train.collate import MultiverseCollator
from multiverse.train.masks import attention_mask_for, resolve_backend
from multiverse.train.trainer import multiverse_forward_loss

NESTED = (
    "<Think>\nSplit the work.\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1: left\n</Outline>\n"
    "<Outline>\n2: right\n</Outline>\n</Goal>\n<Path>\n1: left half.\nLet's think in parallel.\n<Parallel>\n"
    "<Goal>\n<Outline>\n1.1: a\n</Outline>\n<Outline>\n1.2: b\n</Outline>\n</Goal>\n<Path>\n1.1: 2 * 3 = 6.\n</Path>\n"
    "<Path>\n1.2: 4 * 5 = 20.\n</Path>\n<Conclusion>\n6 and 20.\n</Conclusion>\n</Parallel>\nSo 26.\n</Path>\n"
    "<Path>\n2: 7 + 8 = 15.\n</Path>\n<Conclusion>\n26 and 15.\n</Conclusion>\n</Parallel>\n26 + 15 = 41.\n</Think>"
)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()  # shared, never mutated


@pytest.fixture(scope="module")
def tag_ids(tok):
    return grammar.tag_ids(tok)


@pytest.fixture(scope="module")
def records():
    recs = [
        D.Record("nested", "Compute 2*3 + 4*5 and 7+8, then add.", NESTED, "41"),
        *[
            D.Record(f"task{i}", r.question, r.chain, str(r.answer), r.sequential_chain)
            for i, r in enumerate(tasks.generate(3, seed=7))
        ],
    ]
    return recs


def tiny_model(tok, attn: str = "sdpa", seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=-(-len(tok) // 64) * 64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.2,  # large enough that positions and masks move the loss
    )
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config).eval()


def example(tok, record, form="multiverse"):
    ids, labels = D.tokenize(tok, D.render(record, form))
    return D.Example(ids, labels, form, record.source)


def label_token_positions(tok, ids: list[int]) -> set[int]:
    """Token positions of the path labels (``1:`` after ``<Path>\n``), found from character
    offsets of the decoded text (independently of :mod:`multiverse.train.path_labels`)."""
    text = tok.decode(ids, skip_special_tokens=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    spans = [m.span(1) for m in re.finditer(r"<Path>\n(\d+(?:\.\d+)*:)", text)]
    return {
        t
        for t, (a, b) in enumerate(enc["offset_mapping"])
        if any(lo <= a and b <= hi and a < b for lo, hi in spans)
    }


def independent_nll(model, tok, tag_ids, record, form="multiverse") -> tuple[float, int]:
    """Sum of NLL over the assistant tokens (path labels left out) and their count, computed
    without the trainer."""
    ids, _ = D.tokenize(tok, D.render(record, form))
    prompt_len = len(D.prompt_ids(tok, record.question, form))
    skip = label_token_positions(tok, ids)
    pos, mask = attention.positions_and_mask(ids, tag_ids)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[None, None]
    eager = tiny_model(tok, "eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = eager(
            input_ids=torch.tensor([ids]), position_ids=pos[None], attention_mask=additive
        ).logits[0]
    logp = logits.double().log_softmax(-1)
    kept = [t for t in range(prompt_len, len(ids)) if t not in skip]
    total = sum(-float(logp[t - 1, ids[t]]) for t in kept)
    return total, len(kept)


# ----------------------------------------------------------------------------- data


def test_render_puts_labels_on_the_assistant_turn_only(tok, records):
    rec = records[0]
    ids, labels = D.tokenize(tok, D.render(rec, "multiverse"))
    prompt = D.prompt_ids(tok, rec.question)
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [D.IGNORE_INDEX] * len(prompt)
    skip = label_token_positions(tok, ids)
    assert len(skip) >= 2 * grammar.stats(grammar.parse(rec.chain)).blocks  # >= 2 paths a block
    assert all(labels[t] == D.IGNORE_INDEX for t in skip)
    assert all(labels[t] == ids[t] for t in range(len(prompt), len(ids)) if t not in skip)
    target = tok.decode(ids[len(prompt) :], skip_special_tokens=False)
    assert target == rec.chain + "\n\nAnswer: 41<|im_end|>\n"
    user = tok.decode(prompt, skip_special_tokens=False)
    assert rec.question + " Think step by step and in parallel before answering." in user


def test_sequential_form_is_the_flattened_chain(tok, records):
    rec = records[0]
    seq = D.sequential_view(rec.chain)
    assert seq == "<Think>\n" + grammar.flatten(rec.chain) + "\n</Think>"
    assert "<Parallel>" not in seq and "1.2:" not in seq
    messages = D.render(D.Record("x", rec.question, rec.chain, "41"), "sequential")
    assert messages[0]["content"].endswith(" Think step by step before answering.")
    assert messages[1]["content"] == seq + "\n\nAnswer: 41"
    for r in tasks.generate(5, seed=3):  # the task family ships the same sequential text
        assert D.sequential_view(r.chain) == r.sequential_chain


def test_messages_records_train_on_every_assistant_turn(tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "<Think>\nok\n</Think>\n\nAnswer: 1"},
    ]
    ids, labels = D.tokenize(tok, msgs)
    kept = [i for i, x in zip(ids, labels, strict=True) if x != D.IGNORE_INDEX]
    text = tok.decode(kept, skip_special_tokens=False)
    assert text == "hello<|im_end|>\n<Think>\nok\n</Think>\n\nAnswer: 1<|im_end|>\n"
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == full


def test_bad_records_are_reported_and_skipped(tmp_path, tok, records):
    broken = records[1].chain.replace("</Outline>\n</Goal>", "</Goal>", 1)
    assert grammar.validate(broken)
    rows = [
        {"question": records[1].question, "chain": records[1].chain, "answer": "7"},
        {"question": "q", "chain": broken, "answer": "1"},
        {"question": "q", "answer": "1"},
        "not json {",
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"question": "long " * 400, "chain": records[1].chain, "answer": "1"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    examples, report = D.load_examples(path, tok, max_length=400)
    assert len(examples) == 1 and examples[0].source == "d.jsonl:1"
    reasons = {s.source: s.reason for s in report.skipped}
    assert set(reasons) == {"d.jsonl:2", "d.jsonl:3", "d.jsonl:4", "d.jsonl:5", "d.jsonl:6"}
    assert (
        "invalid Multiverse text" in reasons["d.jsonl:2"] and "not closed" in reasons["d.jsonl:2"]
    )
    assert "missing field(s) chain" in reasons["d.jsonl:3"]
    assert "invalid JSON" in reasons["d.jsonl:4"]
    assert "no assistant turn" in reasons["d.jsonl:5"]
    assert "over max_length=400" in reasons["d.jsonl:6"]
    assert report.records == 6 and "5 records skipped" in report.summary()
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(D.DataError, match="no usable training example"):
        D.load_examples(path, tok)


def test_report_counts_the_tasks_trained_on_in_file_order(tmp_path, tok):
    """Records made by multiverse.eval.tasks name their task; the report counts the records
    kept per task (first appearance first), not the skipped ones nor records naming none."""
    warm = tasks.generate(2, seed=1, tasks=["countdown_warmup"])
    mix = tasks.generate(3, seed=1, tasks=["max_total"])
    rows = [r.to_dict() for r in (*warm, *mix)]
    rows.insert(1, {**mix[0].to_dict(), "task": "vowel_sum", "chain": "<Think>\n<Path>\n</Think>"})
    rows.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    rows.append({**mix[1].to_dict(), "task": 3})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, skipped = D.read_records(path)
    assert [r.task for r in records[:3]] == ["countdown_warmup", "vowel_sum", "countdown_warmup"]
    assert records[-1].task is None  # the messages record names no task
    assert [s.source for s in skipped] == ["d.jsonl:8"] and "'task'" in skipped[0].reason
    _, report = D.load_examples(path, tok)
    assert list(report.tasks.items()) == [("countdown_warmup", 2), ("max_total", 3)]
    assert report.examples == 6


def test_parquet_needs_pyarrow(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(D.DataError, match="needs pyarrow"):
        D.read_records(path)


def test_parquet_records(tmp_path, records):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rec = records[1]
    table = pa.table({"question": [rec.question], "chain": [rec.chain], "answer": [rec.answer]})
    pq.write_table(table, tmp_path / "d.parquet")
    got, skipped = D.read_records(tmp_path / "d.parquet")
    assert not skipped and got[0].chain == rec.chain


def test_curriculum_is_fixed_order_with_the_spec_shares():
    order = D.forms_for(10, "multiverse", curriculum=True, epochs=8)
    assert [i for i, _ in order] == [k % 10 for k in range(80)]
    per_segment = [
        sum(f == "multiverse" for _, f in order[s * 10 : (s + 1) * 10]) for s in range(8)
    ]
    assert per_segment == [0, 0, 1, 5, 5, 9, 10, 10]
    # MV examples are spread within a segment, not bunched at its end
    seg = [f for _, f in order[30:40]]
    assert seg[:2].count("multiverse") == 1
    assert D.forms_for(3, "autoregressive", curriculum=False, epochs=2) == [
        (0, "sequential"), (1, "sequential"), (2, "sequential"),
        (0, "sequential"), (1, "sequential"), (2, "sequential"),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- batches and masks


def test_collator_positions_and_shifted_labels(tok, tag_ids, records):
    exs = [example(tok, r) for r in records[:3]]
    batch = MultiverseCollator(tag_ids, tok.pad_token_id, pack=True, pad_to_multiple_of=64)(exs)
    n = sum(len(e) for e in exs)
    ids, pos, shift = batch["input_ids"][0], batch["position_ids"][0], batch["shift_labels"][0]
    assert ids.shape[0] % 64 == 0 and ids.shape[0] >= n
    start = 0
    for e in exs:
        own = attention.layout(e.input_ids, tag_ids).position_ids
        assert torch.equal(pos[start : start + len(e)], own)  # positions restart per example
        assert shift[start + len(e) - 1] == D.IGNORE_INDEX  # never predicts the next example
        assert shift[start : start + len(e) - 1].tolist() == e.labels[1:]
        start += len(e)
    assert (shift[n:] == D.IGNORE_INDEX).all()
    dense = batch["layouts"][0].dense_mask()
    assert not dense[len(exs[0]) :, : len(exs[0])].any()  # no attention across examples


def test_plain_causal_rows_get_no_mask(tok, tag_ids, records):
    seq = [example(tok, r, "sequential") for r in records[:2]]
    rows = MultiverseCollator(tag_ids, tok.pad_token_id, pack=False)(seq)
    assert attention_mask_for(rows["layouts"], "sdpa", "cpu") is None
    packed = MultiverseCollator(tag_ids, tok.pad_token_id, pack=True)(seq)
    assert attention_mask_for(packed["layouts"], "sdpa", "cpu") is not None  # two documents


def test_flex_block_mask_rows_match_the_dense_masks(tok, tag_ids, records):
    from torch.nn.attention.flex_attention import create_mask

    exs = [example(tok, records[0]), example(tok, records[1])]
    batch = MultiverseCollator(tag_ids, tok.pad_token_id, pack=False, pad_to_multiple_of=32)(exs)
    n = batch["input_ids"].shape[1]
    bm = attention_mask_for(batch["layouts"], "flex", "cpu", block_size=32)
    assert bm.shape == (2, 1, n, n)
    got = create_mask(bm.mask_mod, 2, 1, n, n, device="cpu")[:, 0]
    want = torch.stack([lay.dense_mask() for lay in batch["layouts"]])
    assert torch.equal(got, want)
    blocks = bm.to_dense()[:, 0].bool()  # [2, nb, nb]: tiles the kernel visits
    tiles = want.view(2, n // 32, 32, n // 32, 32).any(4).any(2)
    assert torch.equal(blocks, tiles)


def test_flex_cannot_train_on_cpu():
    with pytest.raises(ValueError, match="no CPU backward"):
        resolve_backend("flex", "cpu", training=True)
    assert resolve_backend("auto", "cpu") == "sdpa"


# ----------------------------------------------------------------------------- the loss


def test_loss_equals_independent_mean_nll(tok, tag_ids, records):
    model = tiny_model(tok)
    for rec in records[:2]:
        batch = MultiverseCollator(tag_ids, tok.pad_token_id)([example(tok, rec)])
        with torch.no_grad():
            loss = multiverse_forward_loss(model, batch, "sdpa")
        total, count = independent_nll(model, tok, tag_ids, rec)
        assert int((batch["shift_labels"] != D.IGNORE_INDEX).sum()) == count
        assert float(loss) == pytest.approx(total / count, rel=1e-5)
        # the mask matters: plain causal attention over the same tokens gives another loss
        with torch.no_grad():
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[0]
        prompt_len = len(D.prompt_ids(tok, rec.question))
        logp = logits.double().log_softmax(-1)
        causal = sum(-float(logp[t - 1, ids[0, t]]) for t in range(prompt_len, ids.shape[1]))
        assert abs(causal / count - float(loss)) > 1e-3
        # so do the positions: the layout's, not 0..n-1
        shifted = dict(batch, position_ids=torch.arange(ids.shape[1])[None])
        with torch.no_grad():
            assert abs(float(multiverse_forward_loss(model, shifted, "sdpa")) - float(loss)) > 1e-3


def test_packed_unpacked_and_backends_give_the_same_loss(tok, tag_ids, records):
    model = tiny_model(tok)
    exs = [example(tok, r) for r in records]
    totals = [independent_nll(model, tok, tag_ids, r) for r in records]
    expected = sum(t for t, _ in totals) / sum(c for _, c in totals)
    losses = {}
    for pack in (True, False):
        for backend in ("sdpa", "eager"):
            model.set_attn_implementation(backend)
            batch = MultiverseCollator(tag_ids, tok.pad_token_id, pack=pack, pad_to_multiple_of=16)(
                exs
            )
            with torch.no_grad():
                losses[(pack, backend)] = float(multiverse_forward_loss(model, batch, backend))
    for value in losses.values():
        assert value == pytest.approx(expected, rel=1e-5)


def test_autoregressive_loss_is_plain_causal(tok, tag_ids, records):
    model = tiny_model(tok)
    rec = records[0]
    ex = example(tok, rec, "sequential")
    batch = MultiverseCollator(tag_ids, tok.pad_token_id, pack=False)([ex])
    with torch.no_grad():
        loss = multiverse_forward_loss(model, batch, "sdpa")
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
    prompt_len = len(D.prompt_ids(tok, rec.question, "sequential"))
    logp = logits.double().log_softmax(-1)
    ids = ex.input_ids
    nll = [-float(logp[t - 1, ids[t]]) for t in range(prompt_len, len(ids))]
    assert float(loss) == pytest.approx(sum(nll) / len(nll), rel=1e-5)


@pytest.mark.slow
def test_flex_attention_forward_matches_sdpa(tok, tag_ids, records):
    """The GPU path (BlockMask through transformers' flex_attention) against the SDPA path, on
    CPU in inference mode (flex_attention has no CPU backward; compiling takes a while)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny_model(tok)
    exs = [example(tok, r) for r in records[:2]]
    for pack in (True, False):
        batch = MultiverseCollator(tag_ids, tok.pad_token_id, pack=pack, pad_to_multiple_of=128)(
            exs
        )
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            want = float(multiverse_forward_loss(model, batch, "sdpa"))
            model.set_attn_implementation("flex_attention")
            got = float(multiverse_forward_loss(model, batch, "flex"))
        assert got == pytest.approx(want, rel=1e-4)


def test_bf16_on_a_cpu_that_emulates_it_warns(monkeypatch):
    import warnings

    from multiverse.train import loading

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        loading.warn_if_bf16_emulated(True, torch.device("cpu"))
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loading.warn_if_bf16_emulated(True, torch.device("cpu"))  # native: silent
        loading.warn_if_bf16_emulated(False, torch.device("cpu"))  # float32: silent
        loading.warn_if_bf16_emulated(True, torch.device("meta"))  # not a CPU: silent
