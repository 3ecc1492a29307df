"""Every SPEC 4 bound ends a model that loops, enforced by the driver: models that loop are
*scripted endpoints* (:mod:`scripted`, no model), the engine suite's misbehaving cases as a
stock server would answer them. Each request ends within ``max_tokens`` (depth) and the total
budget with a finish reason; ``max_depth``, ``max_paths`` and ``max_live_branches`` refuse forks
(the branch goes on sequentially); the virtual pool and the tree keep the engine's invariants.
Also: what a stock server needs (``tokenizer=``) and refuses (``merge="exact"``)."""

from __future__ import annotations

import itertools

import pytest
from conftest import serve_app
from scripted import Script, scripted_app

from multiverse.engine.sampling import SamplingParams
from multiverse.format.tokenizer import load_tokenizer
from multiverse.locations import find_model
from multiverse.remote import RemoteLLM

GOAL2 = "<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>\n"
WIDE = (
    "<Parallel>\n<Goal>\n"
    + "".join(f"<Outline>\n{i}: w\n</Outline>\n" for i in range(1, 21))
    + "</Goal>\n"
)
FOUR = (
    "<Parallel>\n<Goal>\n"
    + "".join(f"<Outline>\n{i}: w\n</Outline>\n" for i in range(1, 5))
    + "</Goal>\n"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(find_model())


def _in_path(tok, ctx: list[int]) -> bool:
    """Is the prompt's end inside an open path (its last <Path> after the last </Path>)?"""
    v = tok.get_vocab()

    def last(tag: str) -> int:
        t = v[tag]
        return max((i for i, x in enumerate(ctx) if x == t), default=-1)

    return last("<Path>") > max(last("</Path>"), last("<Conclusion>"))


def _cases(tok):
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731

    def loop(text: str):
        return lambda ctx: itertools.cycle(enc(text))

    def then(head: str, tail: str, in_path_tail: str | None = None):
        def fn(ctx):
            if in_path_tail is not None and _in_path(tok, ctx):
                return itertools.cycle(enc(in_path_tail))
            started = enc("<Parallel>")[0] in ctx
            return (
                itertools.cycle(enc(tail))
                if started
                else itertools.chain(enc(head), itertools.cycle(enc(tail)))
            )

        return fn

    return {  # name: (script, extra params, finish reasons it may end with)
        "path_loop_at_root": (loop("<Path>\n"), {}, {"length"}),
        "endless_nesting": (
            loop(GOAL2),
            {"max_depth": 2},
            {"length", "max_total_tokens", "malformed"},
        ),
        "too_many_paths": (then(WIDE, " x"), {"max_paths": 16}, {"length"}),
        "live_branches": (
            loop(FOUR),
            {"max_live_branches": 6, "max_depth": 3},
            {"length", "max_total_tokens", "malformed"},
        ),
        "never_closes_path": (then(GOAL2, " word", " word"), {}, {"length", "max_total_tokens"}),
        "only_parallel": (loop("<Parallel>"), {}, {"malformed"}),
        "paths_that_never_deepen": (
            then("<Think>\n<Parallel>\n<Goal>\n</Goal>\n", "<Path>\nx\n"),
            {},
            {"max_total_tokens", "malformed"},
        ),  # fmt: skip
        "unclosed_goal": (
            then("<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n", " x"),
            {},
            {"length"},
        ),
    }


def _depth(blocks: list[dict]) -> int:
    return max((1 + max(_depth(p["blocks"]) for p in b["paths"]) for b in blocks), default=0)


def _widths(blocks: list[dict]) -> list[int]:
    return [
        n
        for b in blocks
        for n in [len(b["paths"])] + [w for p in b["paths"] for w in _widths(p["blocks"])]
    ]


@pytest.mark.parametrize("max_total", [None, 50])
@pytest.mark.parametrize(
    "name", sorted(_cases(load_tokenizer(find_model())) if find_model() else [])
)
def test_a_model_that_loops_ends_within_its_bounds(tok, name, max_total):
    fn, extra, reasons = _cases(tok)[name]
    script = Script(fn)
    with serve_app(scripted_app(script)) as url:
        driver = RemoteLLM(url, tokenizer=find_model(), timeout=30)
        assert driver.merge == "flat"  # a stock server
        sp = SamplingParams(temperature=0.0, max_tokens=64, max_total_tokens=max_total, **extra)
        out = driver.generate("q?", sp)[0]
    assert out.merge == "flat" and out.finish_reason != "error", out.error
    allowed = reasons | ({"max_total_tokens"} if max_total else set())
    assert out.finish_reason in allowed, (name, out.finish_reason, out.text[-120:])
    assert (
        out.usage.completion_tokens <= sp.total_budget and out.usage.depth_tokens <= sp.max_tokens
    )
    assert _depth(out.tree["blocks"]) <= sp.max_depth
    assert all(w <= sp.max_paths for w in _widths(out.tree["blocks"]))
    assert script.max_in_flight <= sp.max_live_branches and script.in_flight == 0
    assert out.http_requests == script.calls
    driver.trees[0].check_invariants()
    if name == "too_many_paths":
        assert out.usage.blocks == 0  # refused: 20 outlines > max_paths
    if name in ("endless_nesting", "live_branches") and max_total is None:
        assert out.usage.blocks >= 1  # forked, up to the bound


def test_a_stock_server_needs_the_tokenizer_and_offers_only_flat(tok):
    with serve_app(scripted_app(Script(lambda ctx: iter([0])))) as url:
        with pytest.raises(ValueError, match="--tokenizer"):
            RemoteLLM(url)
        with pytest.raises(ValueError, match="offers flat"):
            RemoteLLM(url, tokenizer=find_model(), merge="exact")
        with pytest.raises(ValueError, match="--served-model other"):
            RemoteLLM(url, tokenizer=find_model(), served_model="other")


def test_requests_are_checked_as_the_engine_checks_them(tok):
    """One validation for both backends (:func:`multiverse.engine.policy.check_request`)."""
    from multiverse.engine.llm import LLM

    local = LLM(str(find_model()), num_kv_slots=4096)
    with serve_app(scripted_app(Script(lambda ctx: iter([0])))) as url:
        remote = RemoteLLM(url, tokenizer=find_model())
        for prompt, params, message in [
            ([], SamplingParams(), "empty prompt"),
            ([1, 2], 3, "params must be a SamplingParams"),
            ([1, 2], SamplingParams(max_tokens=40000), "larger than the model's context"),
        ]:
            for backend in (
                local,
                remote,
            ):  # contexts: the tiny model's 32768, the scripted server's 4096
                with pytest.raises(ValueError, match=message):
                    backend.generate([prompt], params)
        with pytest.raises(ValueError, match="test hook"):
            remote.generate(["q"], SamplingParams(forced_output="x"))
