"""ForkJoin without a model (SPEC 4): the fork into k children sharing the parent's slots, nested
forks, the merge as index concatenation in outline order, the end of a request releasing every
slot, stop strings without Multiverse tags. Tokens are scripted (``forced_output``); every step
ends with the KVManager's and every request's ``check_invariants`` (:class:`ModelFree`)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import ModelFree, block  # noqa: E402

from multiverse.engine.request import Status  # noqa: E402

THREE = "<Think>\n" + block([("1", "a b c d e f g h"), ("2", "x"), ("3", "y z")]) + "</Think>\n\nAnswer: 7"
NESTED = "<Think>\n" + block([
    ("1", "deep\n" + block([("1.1", "p q"), ("1.2", "r")]).rstrip("\n")),
    ("2", "flat"),
]) + "</Think>"  # fmt: skip


def _until(mf: ModelFree, cond, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if cond():
            return
        mf.step()
    raise AssertionError("condition never reached")


def _own_slots(mf: ModelFree, branch) -> list[int]:
    """The slots the scheduler gave ``branch`` for its own tokens, in order (no preemption)."""
    return [s for works in mf.history for w in works if w.branch is branch for s in w.slots]


def test_fork_into_k_children_shares_the_parent_slots(tok):
    mf = ModelFree(tok)
    req = mf.add("Question: 3 + 4?", THREE, max_tokens=400)
    root = req.root
    _until(mf, lambda: root.children)
    kids = root.children
    assert root.status is Status.WAITING and [c.label for c in kids] == ["1", "2", "3"]
    assert req.num_blocks == 1 and req.num_branches == 3
    assert mf.text(req).endswith("</Goal>\n")  # the fork waited for the inserted "\n"
    for c in kids:
        assert c.kv == root.kv and c.kv is not root.kv  # the very slots, no copy of K/V
        assert c.prefix_len == len(root.kv) == root.seq_len and c.num_computed == 0
        assert tok.decode(c.own_ids, skip_special_tokens=False) == f"<Path>\n{c.label}:"
        assert all(c.own_forced) and c.status is Status.RUNNING and c.level == 1
    assert all(mf.kv.refcount(s) == 1 + len(kids) for s in root.kv)
    assert mf.kv.num_used == len(root.kv)  # nothing allocated for the children yet
    assert len({c.own_pos[0] for c in kids}) == 1  # siblings start at the same position
    assert len({c.seed for c in kids}) == 3
    mf.step()  # all three decode in one batch
    assert {w.branch for w in mf.history[-1]} == set(kids)
    mf.run()
    assert mf.text(req) == THREE and req.finish_reason == "stop"


def test_nested_fork_shares_the_whole_chain_of_prefixes(tok):
    mf = ModelFree(tok)
    req = mf.add("q", NESTED, max_tokens=400)
    root = req.root
    _until(mf, lambda: root.children and root.children[0].children)
    one, two = root.children
    inner = one.children
    assert [c.path_label() for c in inner] == [("1", "1.1"), ("1", "1.2")]
    assert one.status is Status.WAITING and [c.level for c in inner] == [2, 2]
    for c in inner:
        assert c.prefix_len == len(one.kv) and c.kv == one.kv
        assert c.kv[: one.prefix_len] == root.kv  # the root's slots, through path 1
    assert all(mf.kv.refcount(s) == 5 for s in root.kv)  # root, paths 1 and 2, 1.1 and 1.2
    assert all(mf.kv.refcount(s) == 3 for s in one.kv[one.prefix_len :])
    assert req.num_blocks == 2 and req.num_branches == 4
    mf.run()
    assert mf.text(req) == NESTED and req.finish_reason == "stop"
    assert mf.kv.num_used == 0


def test_merge_is_prefix_plus_children_in_outline_order_with_the_same_slots(tok):
    mf = ModelFree(tok)
    req = mf.add("q", THREE, max_tokens=400)
    root = req.root
    _until(mf, lambda: root.children)
    prefix, kids = list(root.kv), list(root.children)
    ended: list[str] = []
    while root.children:
        mf.step()
        ended += [c.label for c in kids if c.status is Status.ENDED and c.label not in ended]
    assert ended[:2] == ["2", "3"]  # path 1 is the longest: it ends last
    own = [_own_slots(mf, c) for c in kids]
    assert root.kv == prefix + own[0] + own[1] + own[2]  # outline order, not finish order
    assert mf.kv.num_used == len(root.kv)  # merged: nothing copied, nothing left behind
    assert all(mf.kv.refcount(s) == 1 for s in root.kv) and mf.kv.holders() == [root]
    assert all(not c.kv and mf.kv.held(c) == [] for c in kids)
    assert root.status is Status.RUNNING and root.num_pending == len(mf.encode("<Conclusion>\n"))
    merged = tok.decode(root.own_ids[req.prompt_len :], skip_special_tokens=False)
    assert merged == THREE[: THREE.index("<Conclusion>")] + "<Conclusion>\n"
    assert [p.label for p in root.blocks[0].paths] == ["1", "2", "3"]
    mf.run()
    assert mf.text(req) == THREE


def test_refused_fork_continues_sequentially(tok):
    mf = ModelFree(tok)
    req = mf.add("q", THREE, max_tokens=400, max_paths=2)
    mf.run()
    assert req.num_blocks == 0 and mf.text(req) == THREE and req.finish_reason == "stop"
    assert all(w.branch is req.root for works in mf.history for w in works)
    assert any(w.masked for works in mf.history for w in works)  # path 2 must not see path 1


def test_finish_releases_every_slot_even_mid_fork(tok):
    mf = ModelFree(tok)
    done = mf.add("q", THREE, max_tokens=400)
    cut = mf.add("another q", NESTED, max_tokens=400)
    _until(mf, lambda: cut.root.children and cut.root.children[0].children)
    mf.step()
    branches = cut.branches()
    assert len(branches) == 5 and all(mf.kv.held(b) for b in branches)
    mf.forkjoin.finish(cut, "length")  # children and grandchildren still live: folded
    mf.check()
    assert cut.finished and cut.root.status is Status.FINISHED and not cut.root.children
    assert all(mf.kv.held(b) == [] and b.kv == [] for b in branches)
    assert mf.kv.num_used == len({s for b in done.branches() for s in b.kv})
    text = mf.text(cut)
    assert NESTED.startswith(text[: text.index("<Path>")]) and text.count("<Path>") == 4
    assert [p.label for p in cut.root.blocks[0].paths] == ["1", "2"]
    mf.run()
    assert mf.text(done) == THREE
    assert mf.kv.num_used == 0 and mf.kv.holders() == []


def test_eos_in_a_path_closes_it_with_forced_tokens(tok):
    text = "<Think>\n" + block([("1", "stop here<|endoftext|> never"), ("2", "full")]) + "</Think>"
    mf = ModelFree(tok)
    req = mf.add("q", text, max_tokens=400)
    mf.run()
    out = mf.text(req)
    assert "stop here</Path>\n<Path>\n2: full\n</Path>\n<Conclusion>" in out and "never" not in out


def test_stop_string_without_multiverse_tags(tok):
    """A tokenizer without the tags (no Specials): stop strings still end the request."""
    mf = ModelFree(tok, tags=False)
    assert mf.specials is None
    req = mf.add("q", "alpha beta STOP gamma delta", max_tokens=100, stop=["STOP"])
    mf.run()
    assert req.finish_reason == "stop" and req.stop_offset is not None
    assert mf.text(req).endswith("STOP") and "gamma" not in mf.text(req)


def test_stop_string_in_the_prompt_does_not_stop(tok):
    mf = ModelFree(tok)
    req = mf.add("say STOP", "alpha beta", max_tokens=100, stop=["STOP"])
    mf.run()
    assert mf.text(req) == "alpha beta" and req.stop_offset is None


def test_transitions_and_invariants_reject_broken_state(tok):
    mf = ModelFree(tok)
    req = mf.add("q", THREE, max_tokens=400)
    _until(mf, lambda: req.root.children)
    root = req.root
    with pytest.raises(AssertionError, match="waiting -> closing"):
        root.start_closing()
    root.kv.append(root.kv[0])
    with pytest.raises(AssertionError, match="len\\(kv\\)"):
        req.check_invariants(mf.kv)
    root.kv.pop()
    child = root.children[1]
    child.attend = list(reversed(child.attend))
    with pytest.raises(AssertionError, match="subsequence"):
        req.check_invariants(mf.kv)
    child.attend.reverse()
    mf.kv.release(child)
    with pytest.raises(AssertionError, match="holds 0 slots"):
        req.check_invariants(mf.kv)
