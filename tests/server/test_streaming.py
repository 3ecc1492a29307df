""":class:`BranchStreamer` on forced outputs (nested blocks, uneven paths, two blocks, stop
strings in the root and in nested paths): the streamed text is always a prefix of the final text
and ends equal to it; the branch events rebuild the final tree exactly (stop cuts included),
with every path ended before its block's merge; the incremental streamer sends exactly what the
full re-decode sends."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import block, tiny_pair  # noqa: E402

from multiverse.engine import stops  # noqa: E402
from multiverse.engine.llm import LLM  # noqa: E402
from multiverse.engine.sampling import SamplingParams  # noqa: E402
from multiverse.server.streaming import BranchStreamer, branch_name  # noqa: E402
from multiverse.train.bpe import default_tokenizer  # noqa: E402


def _think(*parts: str) -> str:
    return "<Think>\n" + "".join(parts) + "</Think>\n\nAnswer: 7"


NESTED = _think(block([
    ("1", "deep\n" + block([
        ("1.1", "deeper\n" + block([("1.1.1", "bottom a"), ("1.1.2", "bottom bb")])),
        ("1.2", "side"),
    ])),
    ("2", "flat"),
]), "two blocks\n", block([("1", "again and again"), ("2", "x")]))  # fmt: skip
COLLIDE = _think(block([("1", "deep\n" + block([("2", "two"), ("1.2", "one two")])), ("2", "flat")]))
UNEVEN = _think("first\n", block([("1", "a b c d e f g h i j k"), ("2", "x"), ("3", "y z")]), "after\n")


@pytest.fixture(scope="module")
def llm():
    tok = default_tokenizer()
    return LLM.from_model(tiny_pair(tok)[1], tok, num_kv_slots=4096)


def _paths(tree: dict, text, prefix: str = "") -> list[tuple[str, str]]:
    """(branch name, text) of every path in ``tree`` (the RequestOutput's tree); ``text(start,
    end)``: the final text of a token range."""
    out = []
    for b in tree["blocks"]:
        for p in b["paths"]:
            name = branch_name(prefix, p["label"])
            out.append((name, text(p["start"], p["end"])))
            out += _paths(p, text, name)
    return out


@pytest.mark.parametrize(("text", "stop"), [(NESTED, None), (UNEVEN, None), (UNEVEN, "after"),
                                            (NESTED, ["tom b", "gain"]), (NESTED, ["deeper"]), (COLLIDE, None)],
                         ids=["nested", "uneven", "stop", "nested-path-stops", "stop-above-a-nested-block",
                              "labels-2-and-1.2-under-1"])  # fmt: skip
def test_stream_matches_the_final_output(llm, text, stop):
    tok = llm.tokenizer
    req = llm.add_request("q", SamplingParams(temperature=0, max_tokens=600, forced_output=text, stop=stop))
    streamer, reference = BranchStreamer(tok, token_ids=True), BranchStreamer(tok, False, token_ids=True)
    sent, events, snapshots, ids, id_snapshots = "", [], [], [], []
    while not req.finished:
        llm.step()
        if req.finished:
            break
        delta, evs = streamer.update(req)
        assert (delta, evs) == reference.update(req)  # incremental == full re-decode
        assert streamer.ids == reference.ids
        sent += delta
        events += evs
        ids += streamer.ids
        snapshots.append(sent)
        id_snapshots.append(len(ids))
    out = llm.output(req)
    llm.check_invariants()
    delta, evs = streamer.finish(req, out.text)  # the canonical ids from the tree, not the output
    assert (delta, evs) == reference.finish(req, out.text)
    sent += delta
    events += evs
    ids += streamer.ids
    assert sent == out.text
    assert all(out.text.startswith(s) for s in snapshots)
    assert ids == out.token_ids  # the ids, chunk by chunk, are the output's (stop cuts keep every token)
    assert len(set(id_snapshots)) > 5  # they really streamed
    assert len(set(snapshots)) > 5  # it really streamed
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    n0 = req.prompt_len
    want = _paths(out.tree, lambda a, b: stops.render(decode, req.root.own_ids, req.root.cuts, n0 + a, n0 + b))
    got: dict[tuple[int, str], str] = {}
    for e in events:
        if e["type"] == "delta":
            key = (e["block"], e["branch"])
            got[key] = got.get(key, "") + e["text"]
    assert sorted((name, t) for (_, name), t in got.items()) == sorted(want)
    if stop == ["tom b", "gain"]:  # two nested paths cut, the request went on to the end
        assert "<Path>\n1.1.2: bot</Path>\n" in out.text and "<Path>\n1: a</Path>\n" in out.text
        assert out.text.endswith("Answer: 7")
    if stop == ["deeper"]:  # path 1.1 cut before its nested block: nothing forked inside it
        assert "<Path>\n1.1: </Path>\n<Path>\n1.2: side" in out.text and "1.1.1" not in out.text
    forks = {e["block"]: e for e in events if e["type"] == "fork"}
    assert len(forks) == out.usage.blocks
    for block_id, fork in forks.items():
        merge_at = next(i for i, e in enumerate(events) if e["type"] == "merge" and e["block"] == block_id)
        ends = [i for i, e in enumerate(events) if e["type"] == "path_end" and e["branch"] in fork["paths"]
                and e["block"] == block_id]  # fmt: skip
        assert len(ends) == len(fork["paths"]) and max(ends) < merge_at
    if text is NESTED and stop != ["deeper"]:
        assert {"1/1.1/1.1.1", "1/1.1/1.1.2", "1/1.2", "2"} <= {name for _, name in got}
    if text is COLLIDE:  # engine labels 2 and 1.2 under 1: two names (joined with ".", one)
        assert {"1/2", "1/1.2"} <= {name for _, name in got}


@pytest.mark.parametrize("stop", [None, ["deeper"]])
def test_an_abort_inside_nested_blocks_closes_the_stream(llm, stop):
    """Aborted while nested paths decode: the folded blocks close (path_end, merge), the stream
    ends equal to the final text, and the incremental streamer still matches the full re-decode."""
    tok = llm.tokenizer
    req = llm.add_request("q", SamplingParams(temperature=0, max_tokens=600, forced_output=NESTED, stop=stop))
    streamer, reference = BranchStreamer(tok, token_ids=True), BranchStreamer(tok, False, token_ids=True)
    sent, events, ids = "", [], []
    while sum(1 for b in req.branches() if b.parent is not None) < 3:
        llm.step()
        chunk = streamer.update(req)
        assert chunk == reference.update(req)
        sent += chunk[0]
        events += chunk[1]
        ids += streamer.ids
    llm.abort(req)
    out = llm.output(req)
    rest = streamer.finish(req, out.text)
    assert rest == reference.finish(req, out.text)
    assert out.finish_reason == "abort" and sent + rest[0] == out.text
    assert ids and ids + streamer.ids == out.token_ids  # the folded blocks' ids come last
    events += rest[1]
    forks = [e for e in events if e["type"] == "fork"]
    assert len(forks) >= 2 and len([e for e in events if e["type"] == "merge"]) == len(forks)
    ended = {(e["block"], e["branch"]) for e in events if e["type"] == "path_end"}
    assert ended == {(f["block"], p) for f in forks for p in f["paths"]}


class _Counting:
    """A tokenizer that counts the tokens it is asked to decode."""

    def __init__(self, tok) -> None:
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


@pytest.mark.parametrize("stop", [None, ["never there"]])
def test_each_step_decodes_only_what_is_new(llm, stop):
    """The streamer's work per step does not grow with the text (the old one re-decoded it all)."""
    text = "alpha beta gamma délta € 😀 epsilon\n" * 60
    sp = SamplingParams(temperature=0, max_tokens=400, forced_output=text, parallel=False, stop=stop)
    req = llm.add_request("q", sp)
    inc, full = _Counting(llm.tokenizer), _Counting(llm.tokenizer)
    streamers = BranchStreamer(inc), BranchStreamer(full, incremental=False)
    per_step = []
    while True:
        llm.step()
        if req.finished:
            break
        before = inc.decoded
        assert streamers[0].update(req) == streamers[1].update(req)
        per_step.append(inc.decoded - before)
    assert len(per_step) > 300 and max(per_step) <= 8, max(per_step)
    assert full.decoded > 100 * sum(per_step)  # the reference re-decodes everything every step
    llm.output(req)


def test_a_later_paths_block_merging_as_the_first_path_ends(llm):
    """Path 2 forks while path 1 still runs; path 1's length is varied until its end and path
    2's merge come in the same engine step: path 2's text before its block must still go out
    before its block's paths (text and ids a prefix of the final after every step)."""
    tok, together = llm.tokenizer, 0
    for filler in range(30, 60):
        inner = block([("2.1", "p q"), ("2.2", "r")])
        text = _think(block([("1", "a" + " b" * filler), ("2", "x\n" + inner)]))
        params = SamplingParams(temperature=0, max_tokens=600, forced_output=text)
        req, streamer = llm.add_request("q", params), BranchStreamer(tok, token_ids=True)
        sent, ids, snapshots = "", [], []
        while not req.finished:
            llm.step()
            if not req.finished:
                delta, events = streamer.update(req)
                sent += delta
                ids += streamer.ids
                snapshots.append((sent, list(ids)))
                kinds = {(e["type"], e["branch"]) for e in events}
                together += {("path_end", "1"), ("merge", "2")} <= kinds
        out = llm.output(req)
        assert out.usage.blocks == 2
        for s, got in snapshots:
            assert out.text.startswith(s) and got == out.token_ids[: len(got)], filler
    assert together  # the case this is about happened
