"""The vLLM plugin's token-id rules (``plugins/vllm/multiverse_vllm/plan.py``), without vLLM: the
position hook's answer, the tokens a causal engine cannot compute (sibling paths), which tokens a
path's closing request keeps, and the load plan of a merged request (or why there is none).
Worked on SPEC 3's example (``q <Parallel> <Goal> ... <Path> x x </Path> ⏎ <Path> y </Path> ⏎
<Conclusion> c ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "vllm"))

from multiverse_vllm.config import hf_overrides  # noqa: E402
from multiverse_vllm.plan import (  # noqa: E402
    Copy,
    isolated_runs,
    layout_positions,
    plan_load,
    save_range,
    seq_key,
)

from multiverse.format.grammar import TAGS  # noqa: E402
from multiverse.format.layout import layout  # noqa: E402

TAG = {t: 100 + i for i, t in enumerate(TAGS)}
NL, Q, A, B, X, Y, C, END = 1, 2, 3, 4, 5, 6, 7, 8
EXAMPLE = [Q, TAG["<Parallel>"], TAG["<Goal>"], TAG["<Outline>"], A, TAG["</Outline>"], TAG["<Outline>"], B,
           TAG["</Outline>"], TAG["</Goal>"], NL,
           TAG["<Path>"], X, X, TAG["</Path>"], NL,  # 11-15
           TAG["<Path>"], Y, TAG["</Path>"], NL,  # 16-19
           TAG["<Conclusion>"], C, TAG["</Conclusion>"], TAG["</Parallel>"], END]  # fmt: skip
MERGED = EXAMPLE[:21]  # the merged request: prefix + both paths + <Conclusion>
PATH_X = EXAMPLE[:16]  # path x's closing request: its whole sequence
PATH_Y = EXAMPLE[:11] + EXAMPLE[16:20]  # path y's: the prefix and itself, not x


def test_positions_are_the_layout_rules_in_three_equal_rows():
    pos, delta = layout_positions(EXAMPLE, TAG)
    assert pos.shape == (3, len(EXAMPLE))
    assert (pos == pos[0]).all()
    assert pos[0].tolist() == layout(EXAMPLE, TAG).position_ids.tolist()
    assert pos[0, 16:21].tolist() == [11, 12, 13, 14, 16]  # SPEC 3's table: y restarts at s = 11
    assert delta == 20 + 1 - len(
        EXAMPLE
    )  # the last position is 20: generated tokens run on from it
    assert layout_positions(PATH_Y, TAG)[1] == 0  # a path request is contiguous


def test_only_the_sibling_path_is_isolated():
    (run,) = isolated_runs(EXAMPLE, TAG)
    assert (run.start, run.end) == (16, 20)
    assert [EXAMPLE[k] for k in run.context] == PATH_Y
    assert isolated_runs(PATH_X, TAG) == [] and isolated_runs(PATH_Y, TAG) == []


def test_a_closing_request_keeps_its_path_from_the_block_boundary():
    assert save_range(PATH_Y, TAG, block_size=4) == (8, 15)  # path y: tokens 11-14 of its sequence
    assert save_range(PATH_X, TAG, block_size=32) == (0, 16)
    assert save_range(EXAMPLE[:11], TAG, 4) is None  # not a path's end
    assert save_range(MERGED, TAG, 4) is None


def test_the_merged_request_loads_the_tail_of_path_x_and_all_of_y():
    saved = {seq_key(PATH_X): (8, 16), seq_key(PATH_Y): (8, 15)}
    copies, why = plan_load(MERGED, TAG, 12, saved.get)
    assert why is None
    # 12-15 (the rest of x: plain, from x's own sequence), then y from its sequence (11-14)
    assert copies == [Copy(seq_key(PATH_X), 12, 12, 4), Copy(seq_key(PATH_Y), 11, 16, 4)]
    assert plan_load(MERGED, TAG, 20, saved.get) == ([], None)  # the prefix cache has it all


@pytest.mark.parametrize("missing", ["x", "y"])
def test_a_missing_path_is_a_reason_never_a_partial_plan(missing):
    saved = {seq_key(PATH_X): (8, 16), seq_key(PATH_Y): (8, 15)}
    del saved[seq_key(PATH_X if missing == "x" else PATH_Y)]
    copies, why = plan_load(MERGED, TAG, 12, saved.get)
    assert copies == [] and why
    # a saved path that does not reach back far enough is no source either
    short = {seq_key(PATH_X): (14, 16), seq_key(PATH_Y): (8, 15)}
    assert plan_load(MERGED, TAG, 12, short.get)[1]


def test_hf_overrides_turn_on_m_rope_for_a_llama_dir(tmp_path):
    import json

    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9,
           "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ov = hf_overrides(tmp_path)
    assert ov["architectures"] == ["MultiverseLlamaForCausalLM"]
    assert sum(ov["rope_parameters"]["mrope_section"]) == 64 // 2
    assert ov["rope_parameters"]["rope_theta"] == 100000.0
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no Multiverse variant"):
        hf_overrides(tmp_path)


def test_each_hook_refuses_to_run_without_the_other():
    from types import SimpleNamespace as NS

    from multiverse_vllm.config import check_connector, check_positions, transfer_config

    with pytest.raises(ValueError, match="needs the Multiverse KV connector"):
        check_connector(NS(kv_transfer_config=None))
    check_connector(NS(kv_transfer_config=NS(**transfer_config())))
    plain = NS(model_config=NS(uses_mrope=False, hf_config=NS(architectures=["LlamaForCausalLM"])))
    with pytest.raises(ValueError, match="needs the Multiverse position hook"):
        check_positions(plain)
    check_positions(NS(model_config=NS(uses_mrope=True, hf_config=NS(architectures=["MultiverseLlamaForCausalLM"]))))


def test_the_book_of_saved_paths_is_bounded():
    from multiverse_vllm.plan import Entries

    book = Entries(max_tokens=10)
    assert book.add("a", 0, 4) == (True, [], None)
    assert book.add("b", 2, 6) == (True, [], None)
    assert book.add("a", 0, 4) == (False, [], None)  # kept already: touched, now the most recent
    assert book.add("c", 0, 5) == (True, ["b"], None)  # least recently used goes first
    assert book.used == 9 and book.get("b") is None
    ok, evicted, why = book.add("d", 0, 11)  # over the cap: refused, with the reason, nothing evicted
    assert not ok and evicted == [] and "cap max_tokens=10" in why
    assert sorted(book.drop({"a", "b"})) == ["a"] and book.used == 5  # merged: freed


def test_a_nested_block_is_loaded_with_its_outer_path():
    goal = [TAG["<Parallel>"], TAG["<Goal>"], TAG["<Outline>"], A, TAG["</Outline>"], TAG["<Outline>"], B,
            TAG["</Outline>"], TAG["</Goal>"], NL]  # fmt: skip
    prefix = [Q, *goal]
    p0 = [TAG["<Path>"], X, TAG["</Path>"], NL]
    inner = [TAG["<Path>"], X, TAG["</Path>"], NL, TAG["<Path>"], Y, TAG["</Path>"], NL,
             TAG["<Conclusion>"], C, TAG["</Conclusion>"], TAG["</Parallel>"]]  # fmt: skip
    p1 = [TAG["<Path>"], *goal, *inner, TAG["</Path>"], NL]
    merged = prefix + p0 + p1 + [TAG["<Conclusion>"]]
    (run,) = isolated_runs(merged, TAG)  # the inner sibling lies inside the outer one's run
    assert (run.start, run.end) == (len(prefix + p0), len(prefix + p0 + p1))
    assert [merged[k] for k in run.context] == prefix + p1
    saved = {seq_key(prefix + p0): (0, len(prefix + p0)), seq_key(prefix + p1): (8, len(prefix + p1))}
    copies, why = plan_load(merged, TAG, 8, saved.get)
    assert why is None and [c.key for c in copies] == [seq_key(prefix + p0), seq_key(prefix + p1)]
    assert copies[-1].dst + copies[-1].length == len(merged) - 1  # vLLM computes <Conclusion> itself
