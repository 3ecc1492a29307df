"""A structured prompt re-uses the cached K/V of its paths (:mod:`multiverse.engine.reuse`): the
remote driver's exact requests (Map, one request per path, Reduce) on one engine, the Reduce
prefilling only what no path request computed; tokens and logprobs those of a cold engine and of
a full forward by the layout rule. Tiny random Qwen2, CPU, invariants after every step."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, check_output, engine  # noqa: E402

from multiverse import SamplingParams  # noqa: E402
from multiverse.engine.reuse import path_runs  # noqa: E402
from multiverse.format.tokenizer import tag_ids  # noqa: E402

PROMPT = list(range(200, 220))


class Driver:
    """The remote driver's exact-mode requests, sent to an engine: each request's output is
    forced (the test hook) and ends at a stop tag, which is sampled, not computed."""

    def __init__(self, llm, tok) -> None:
        self.llm, self.tok = llm, tok
        self.computed: list[int] = []  # per request: prompt tokens the engine computed

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def send(self, prompt: list[int], text: str, stop: str | None = None, logprobs: bool = False):
        forced = self.ids(text) + ([self.tok.convert_tokens_to_ids(stop)] if stop else [])
        stops = [forced[-1]] if stop else None
        sp = SamplingParams(temperature=0.0, max_tokens=len(forced) + 2, forced_output=forced,
                            stop_token_ids=stops, max_depth=0, logprobs=logprobs, ignore_eos=True)  # fmt: skip
        counts: list[int] = []
        run = self.llm.runner.run

        def spy(works):
            counts.extend(w.count for w in works if w.branch.parent is None and w.start < len(prompt)
                          and w.branch.request.prompt_ids == prompt)  # fmt: skip
            return run(works)

        self.llm.runner.run = spy
        try:
            out = self.llm.generate(prompt, sp)[0]
        finally:
            self.llm.runner.run = run
        self.computed.append(sum(counts))
        return out

    def fork(
        self, context: list[int], paths: list[tuple[str, str]]
    ) -> tuple[list[int], list[list[int]]]:
        """Path requests after a Map that stopped at ``</Goal>``: (the block's prefix, each
        path's cached tokens: its start and output)."""
        prefix = context + self.ids("</Goal>\n")
        cached = []
        for label, body in paths:
            start = self.ids(f"<Path>\n{label}:")
            out = self.send(prefix + start, body, stop="</Path>")
            assert out.token_ids == self.ids(body) and out.finish_reason == "stop"
            cached.append(start + out.token_ids)
        return prefix, cached

    def merged(self, prefix: list[int], cached: list[list[int]]) -> list[int]:
        """The Reduce request's prompt: the paths in outline order, then ``<Conclusion>\\n``."""
        return (
            prefix
            + [t for p in cached for t in p + self.ids("</Path>\n")]
            + self.ids("<Conclusion>\n")
        )


def _cold(pair, tok, prompt, text):
    return Driver(engine(pair[1], tok, num_kv_slots=1024, enable_prefix_cache=False), tok).send(
        prompt, text, stop="</Conclusion>", logprobs=True
    )


def _same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


HEAD = "<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n<Outline>\n3: c\n</Outline>\n"
PATHS = [("1", " a b c\n"), ("2", " x y\n"), ("3", " p q r s\n")]


def test_the_reduce_request_prefills_only_what_no_path_request_computed(pair, tok):
    d = Driver(engine(pair[1], tok, num_kv_slots=1024), tok)
    mapped = d.send(PROMPT, HEAD, stop="</Goal>")
    prefix, cached = d.fork(PROMPT + mapped.token_ids, PATHS)
    reduce = d.merged(prefix, cached)
    out = d.send(reduce, "all\n", stop="</Conclusion>", logprobs=True)
    # every path's start and output came from its own request, except "<Path>\n" of paths 2 and
    # 3 (their requests hit path 1's: a root lists a slot once); "</Path>\n" of each path (the
    # stop was sampled, not computed) and "<Conclusion>\n" remain. Old code: paths 2 and 3 too
    shared = len(d.ids("<Path>\n"))
    assert d.computed[-1] == len(reduce) - len(prefix) - sum(len(p) for p in cached) + 2 * shared
    assert d.computed[-1] == 2 * 2 + 3 * 2 + 2
    _same(out, _cold(pair, tok, reduce, "all\n"))
    check_output(pair[0], tok, out)  # positions and logprobs of a full forward by the layout rule
    assert_no_leak(d.llm)


def test_path_runs_give_each_path_its_segment_and_what_it_sees_before_it(tok):
    text = ("q <Parallel>\n<Goal>\n</Goal>\n<Path>\n1: a\n</Path>\n<Path>\n2: b <Parallel>\n<Goal>\n</Goal>\n"
            "<Path>\n1: c\n</Path>\n<Path>\n2: d\n</Path>\n<Conclusion>\ne\n</Conclusion>\n</Parallel>\n f\n</Path>\n"
            "<Conclusion>\ng")  # fmt: skip
    ids = tok.encode(text, add_special_tokens=False)
    names = {i: t for t, i in tag_ids(tok).items()}
    at = [i for i, t in enumerate(ids) if names.get(t) == "<Path>"]
    ends = [i for i, t in enumerate(ids) if names.get(t) in ("<Conclusion>", "</Parallel>")]
    runs = path_runs(ids, names)
    assert [(r.start, r.end) for r in runs] == [
        (at[0], at[1]),
        (at[1], ends[2]),
        (at[2], at[3]),
        (at[3], ends[0]),
    ]
    outer = ((0, at[0]),)
    assert runs[0].context == runs[1].context == outer
    inner = ((0, at[0]), (at[1], at[2]))  # not path 1 of the outer block
    assert runs[2].context == runs[3].context == inner
    assert runs[3].key(ids, len(ids)) == ids[: at[0]] + ids[at[1] : at[2]] + ids[at[3] : ends[0]]
    assert path_runs(tok.encode("<Path>\n1: a\n</Path>\n", add_special_tokens=False), names) == []


def test_a_nested_path_is_reused_whole_after_its_own_reduce_and_by_runs_without_it(pair, tok):
    # path 2 forks itself: its Map stops at the inner </Goal>, two inner path requests, the inner
    # Reduce continues path 2 up to its </Path>; the outer Reduce then finds path 2 cached whole
    inner_head = " b <Parallel>\n<Goal>\n<Outline>\n1: c\n</Outline>\n<Outline>\n2: d\n</Outline>\n"
    inner_paths = [("1", " c\n"), ("2", " d d\n")]
    for inner_reduce in (True, False):
        d = Driver(engine(pair[1], tok, num_kv_slots=1024), tok)
        mapped = d.send(PROMPT, HEAD, stop="</Goal>")
        prefix, cached = d.fork(PROMPT + mapped.token_ids, PATHS[:1])
        start2 = d.ids("<Path>\n2:")
        head2 = d.send(prefix + start2, inner_head, stop="</Goal>").token_ids
        inner_prefix, inner_cached = d.fork(prefix + start2 + head2, inner_paths)
        inner = d.merged(inner_prefix, inner_cached)
        tail = d.ids("e\n</Conclusion>\n</Parallel>\n f\n")
        if inner_reduce:
            assert (
                d.send(inner, "e\n</Conclusion>\n</Parallel>\n f\n", stop="</Path>").token_ids
                == tail
            )
            assert (
                d.computed[-1] == 2 + 2 * 2 + 2
            )  # "<Path>\n" of inner path 2, "</Path>\n" twice, "<Conclusion>\n"
        path2 = inner[len(prefix) :] + tail
        reduce = d.merged(prefix, cached + [path2])
        out = d.send(reduce, "all\n", stop="</Conclusion>", logprobs=True)
        # without the inner Reduce, path 2's own tokens after its inner paths are computed too
        # (the nested runs are found with their context: the prefix and path 2's head, not path 1)
        rest = len(inner) - len(inner_prefix) - sum(len(p) for p in inner_cached) + 2 + len(tail)
        assert d.computed[-1] == 2 + 2 + 2 * 2 + (0 if inner_reduce else rest)
        _same(out, _cold(pair, tok, reduce, "all\n"))
        check_output(pair[0], tok, out)
        assert_no_leak(d.llm)


def test_eviction_in_a_small_pool_frees_slots_several_entries_share(pair, tok):
    # the Reduce's entry lists the paths' slots, which their own entries hold too: eviction must
    # free them once both are gone (old code: never, their count is 2) and never while read
    llm = engine(pair[1], tok, num_kv_slots=192)  # invariants after every step
    evict, freed = llm.radix.evict, []
    llm.radix.evict = lambda n: freed.append(evict(n)) or freed[-1]
    d = Driver(llm, tok)
    for round in range(5):
        paths = [(label, body + " z" * round) for label, body in PATHS]
        mapped = d.send(PROMPT + [230 + round], HEAD, stop="</Goal>")
        prefix, cached = d.fork(PROMPT + [230 + round] + mapped.token_ids, paths)
        reduce = d.merged(prefix, cached)
        out = d.send(reduce, "all\n", stop="</Conclusion>", logprobs=True)
        assert d.computed[-1] == 2 * 2 + 3 * 2 + 2
        _same(out, _cold(pair, tok, reduce, "all\n"))
        shared = [s for s in range(llm.kv.num_slots) if llm.kv.refcount(s) > 1]
        assert shared  # no request runs: only cache entries hold these, two or more each
    assert sum(freed) > llm.kv.num_slots  # the pool was recycled, shared slots included
    assert llm.radix.evictable_slots() == llm.kv.num_used
    assert_no_leak(llm)


@pytest.mark.parametrize(("slots", "chunk"), [(1024, 3), (160, 2)])
def test_a_reduce_prefilled_in_small_chunks_beside_another_request_gives_the_cold_output(
    pair, tok, slots, chunk
):
    # chunks stop where a cached run begins; in a small pool the other request competes for it
    llm = engine(pair[1], tok, num_kv_slots=slots, prefill_chunk=chunk)
    d = Driver(llm, tok)
    mapped = d.send(PROMPT, HEAD, stop="</Goal>")
    prefix, cached = d.fork(PROMPT + mapped.token_ids, PATHS)
    reduce = d.merged(prefix, cached)
    other = llm.add_request(
        list(range(300, 320)),
        SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True, parallel=False),
    )
    llm.step()
    out = d.send(reduce, "all\n", stop="</Conclusion>", logprobs=True)
    while not other.finished:
        llm.step()
    if slots == 1024:
        assert d.computed[-1] == 2 * 2 + 3 * 2 + 2  # nothing evicted: the same runs as in one chunk
    _same(out, _cold(pair, tok, reduce, "all\n"))
    assert other.finish_reason == "length"
    assert_no_leak(llm)
