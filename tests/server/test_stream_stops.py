"""Stop strings and streaming, as properties over random forced outputs (hypothesis): a stop in
the prefix, in path k of n, in the Conclusion, across token boundaries, overlapping stops,
multi-byte characters. The streamed text is always a prefix of the final text and ends equal to
it; the final text equals ``LLM.generate``'s and an independent model of the stop semantic
(docs/streaming.md); every path's deltas are its final text; the incremental streamer sends
exactly the chunks of the full re-decode (:mod:`multiverse.server.detokenize`), which is also
checked alone on random token sequences."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
from _engine_util import block, tiny_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multiverse.engine import stops
from multiverse.engine.llm import LLM
from multiverse.engine.sampling import SamplingParams
from multiverse.format.document import TAGS
from multiverse.server.detokenize import Chars, FullText, IncrementalText
from multiverse.server.streaming import BranchStreamer, branch_name
from multiverse.train.bpe import default_tokenizer

ALPHABET = "abqxyZ .\né€😀"  # 1 to 4 UTF-8 bytes: characters split across byte tokens
TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")


@pytest.fixture(scope="module")
def llm():
    tok = default_tokenizer()
    return LLM.from_model(tiny_pair(tok)[1], tok, num_kv_slots=4096)


# -- the model of the semantic (independent of multiverse.engine.stops) ----------------------
def _first_stop(run: str, stop: list[str]) -> int | None:
    """Start of the first completed stop in ``run`` (earliest end, then earliest start)."""
    hits = [(run.index(s) + len(s), run.index(s)) for s in stop if s in run]
    return min(hits)[1] if hits else None


def _cut(text: str, stop: list[str]) -> int | None:
    """Where a stop cuts model-written ``text``: in a run between tags, or ending in the tag that
    follows the run (then before the tag: a tag is never cut in half)."""
    pos, parts = 0, [*TAG_RE.split(text), ""]  # run, tag, run, tag, ..., run, ""
    for run, tag in zip(parts[::2], parts[1::2], strict=True):
        k = _first_stop(run, stop)
        if k is None and tag:
            k = _first_stop(run + tag, stop)
            k = None if k is None else min(k, len(run))
        if k is not None:
            return pos + k
        pos += len(run) + len(tag)
    return None


def expected_text(head: str, bodies: list[str], tail: str, stop: list[str]) -> str:
    """The final text of forced output ``head`` (up to ``</Goal>``) + the paths + ``tail`` (after
    ``<Conclusion>\\n``): engine-inserted text (``\\n`` after ``</Goal>``, ``<Path>\\nk:``, ``\\n``
    after ``</Path>``, ``<Conclusion>\\n``) never matches; a stop in a path cuts that path only;
    a tag the model writes can end a match (cut before the tag)."""
    k = _cut(head, stop)
    if k is not None:
        return head[:k]
    out = head + "\n"
    for i, body in enumerate(bodies, 1):
        run = f" {body}\n"
        k = _cut(run + "</Path>", stop)  # the model's </Path> (the engine adds the \n)
        out += f"<Path>\n{i}:" + (run if k is None else run[:k]) + "</Path>\n"
    k = _cut(tail, stop)
    return out + "<Conclusion>\n" + (tail if k is None else tail[:k])


@st.composite
def cases(draw):
    """(prefix, path bodies, conclusion, text after the block, stop strings): stops drawn mostly
    from the paths' text (the alphabets differ a little, so a stop lands where it was drawn)."""
    prefix = draw(st.text("xyé. \n", max_size=8))
    bodies = draw(st.lists(st.text("abZ€😀é .", max_size=10), min_size=1, max_size=4))
    conclusion, after = (
        draw(st.text("qé€😀 ", min_size=1, max_size=8)),
        draw(st.text("xyq", max_size=5)),
    )
    stop = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["path", "path", "path", "conclusion", "prefix", "random", "engine"])
        )
        if kind in ("path", "conclusion", "prefix"):
            src = (
                draw(st.sampled_from(bodies))
                if kind == "path"
                else conclusion
                if kind == "conclusion"
                else prefix
            )
            i = draw(st.integers(0, len(src)))
            s = src[i : i + draw(st.integers(1, 4))]
        elif kind == "random":
            s = draw(st.text(ALPHABET, min_size=1, max_size=3))
        else:
            s = draw(st.sampled_from(["Path>", "1:", "\n2:", "<Conclusion>", "</Path>\n", ":", "</Think>", "<Goal>",
                                      "Goal>", "\n</Path>", "</Outline>\n", "\n</Conclusion>"]))  # fmt: skip
        if s:
            stop.append(s)
            if len(s) > 1 and draw(st.booleans()):  # an overlapping stop
                stop.append(
                    draw(st.sampled_from([s[1:], s[:-1], s + draw(st.sampled_from(ALPHABET))]))
                )
    return prefix, bodies, conclusion, after, stop


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cases())
def test_streamed_stops_agree_with_the_final_text(llm, case):
    prefix, bodies, conclusion, after, stop = case
    forced = ("<Think>\n" + prefix + "\n" + block([(str(i), b) for i, b in enumerate(bodies, 1)], conclusion)
              + after + "</Think>")  # fmt: skip
    goal_end = forced.index("</Goal>") + len("</Goal>")
    tail = forced[forced.index("<Conclusion>\n") + len("<Conclusion>\n") :]
    want = expected_text(forced[:goal_end], bodies, tail, stop)
    sp = SamplingParams(temperature=0.0, max_tokens=600, forced_output=forced, stop=stop or None)
    warnings = _Warnings()
    logging.getLogger("multiverse.server").addHandler(warnings)
    try:
        req = llm.add_request("q", sp)
        inc, ref = BranchStreamer(llm.tokenizer), BranchStreamer(llm.tokenizer, incremental=False)
        sent, events, snapshots = "", [], []
        while True:
            llm.step()
            if req.finished:
                break
            chunk = inc.update(req)
            assert chunk == ref.update(req)
            sent += chunk[0]
            events += chunk[1]
            snapshots.append(sent)
        out = llm.output(req)
        rest = inc.finish(req, out.text)
        assert rest == ref.finish(req, out.text)
    finally:
        logging.getLogger("multiverse.server").removeHandler(warnings)
    assert not warnings.records, [
        r.getMessage() for r in warnings.records
    ]  # the streamer's own text
    sent += rest[0]
    events += rest[1]
    assert out.text == want
    assert sent == out.text and all(out.text.startswith(s) for s in snapshots)
    assert llm.generate(["q"], sp)[0].text == out.text
    llm.check_invariants()
    # every path's deltas, concatenated, are its text in the final output
    root, n0 = req.root, req.prompt_len
    paths: dict[tuple[int, str], str] = {}
    for e in events:
        if e["type"] == "delta":
            paths[(e["block"], e["branch"])] = paths.get((e["block"], e["branch"]), "") + e["text"]
    final_paths = {}
    for b, blk in enumerate(out.tree["blocks"]):
        for p in blk["paths"]:
            text = stops.render(lambda ids: llm.tokenizer.decode(ids, skip_special_tokens=False), root.own_ids,
                                root.cuts, n0 + p["start"], n0 + p["end"])  # fmt: skip
            final_paths[(b, branch_name("", p["label"]))] = text
    assert paths == final_paths


# -- the incremental decoder against the full re-decode, without the engine ----------------
@pytest.fixture(scope="module")
def token_pool():
    tok = default_tokenizer()
    ids = set(range(3, 259))  # the byte symbols: lone and partial UTF-8 bytes
    ids |= set(tok.encode("héllo wörld € 😀 ab\n\n. é€😀Z", add_special_tokens=False))
    tags = {tok.convert_tokens_to_ids(t): t for t in TAGS}
    inserted = sorted(
        set(tok.encode("\n1:2:</Path>\n", add_special_tokens=False))
    )  # what the engine inserts
    return tok, sorted(ids), tags, inserted


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_incremental_text_equals_the_full_decode(token_pool, data):
    tok, ids, tags, inserted = token_pool
    decode = lambda x: tok.decode(x, skip_special_tokens=False)  # noqa: E731
    first = data.draw(st.integers(0, 3))
    chunk = data.draw(st.sampled_from([1, 3, 1024]))  # Chars' chunks: cuts across them too
    b = SimpleNamespace(own_ids=[], own_forced=[], blocks=[], cuts=[])
    token = st.one_of(st.sampled_from(ids), st.sampled_from(sorted(tags)))
    for _ in range(first):
        b.own_ids.append(data.draw(st.sampled_from(ids)))
        b.own_forced.append(False)
    inc, full = IncrementalText(first, chunk), FullText(first)

    def same(final: bool) -> None:
        inc.advance(b, decode, tags, final, None)
        full.advance(b, decode, tags, final, None)
        assert inc.piece(0) == full.piece(0) and inc.length() == full.length()
        assert inc.run_len() == full.run_len()
        assert inc.tail(3) == full.tail(3)

    for _ in range(data.draw(st.integers(1, 12))):
        for _ in range(data.draw(st.integers(1, 4))):
            forced = data.draw(st.integers(0, 9)) == 0
            b.own_ids.append(data.draw(st.sampled_from(inserted) if forced else token))
            b.own_forced.append(forced)
        same(False)
    if data.draw(st.booleans()):  # a stop cut ends the run, then forced closing tokens
        r = stops.run_start(b.own_ids, b.own_forced, tags, first)
        run = decode(b.own_ids[r:])
        b.cuts.append((r, len(b.own_ids), run[: data.draw(st.integers(0, len(run)))]))
        if data.draw(st.booleans()):  # a path (the root ends right after its cut)
            b.own_ids += tok.encode("</Path>\n", add_special_tokens=False)
            b.own_forced += [True] * (len(b.own_ids) - len(b.own_forced))
    same(True)
    assert full.piece(0) == stops.render(decode, b.own_ids, b.cuts, first)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6),
    st.lists(
        st.tuples(
            st.integers(0, 3), st.text("ab€😀", max_size=9), st.integers(0, 40), st.integers(0, 40)
        )
    ),
)
def test_chars_reads_as_the_string_it_grew_into(chunk, ops):
    # appends, cuts and pieces of the incremental text's store against a plain str
    chars, ref = Chars(chunk), ""
    for op, text, a, b in ops:
        if op == 0:
            chars.truncate(min(a, len(ref)))
            ref = ref[: min(a, len(ref))]
        else:
            chars.append(text)
            ref += text
        assert len(chars) == len(ref) and str(chars) == ref
        assert chars.piece(a, b) == ref[a:b] and chars.piece(a) == ref[a:]
