"""Decode graphs fail safe, driven on the CPU by capturers that fail on chosen buckets: a bucket
whose capture raises runs eagerly with the same tokens as the all-graphs engine and the eager
engine, with exactly one warning naming it and the cause; the start-up capture reports its time
and the memory the graphs hold; the buckets never exceed what the pool and the step budget can
fill; ``cuda_graphs=False`` (``--no-cuda-graphs``) turns the graphs off."""

from __future__ import annotations

import argparse
import logging
from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, check_output, engine, tiny_pair  # noqa: E402

import multiverse  # noqa: E402
from multiverse import SamplingParams  # noqa: E402
from multiverse.cli import main  # noqa: E402
from multiverse.cli.common import add_device_arguments  # noqa: E402
from multiverse.engine.model import KVPool  # noqa: E402
from multiverse.engine.model.graphs import (  # noqa: E402
    DecodeGraphs,
    EagerCapturer,
    batch_buckets,
    bucket_limits,
)

LOGGER = "multiverse.engine.model.graphs"
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


class Recording(EagerCapturer):
    """Warm-up at capture time (as a CUDA capture does); counts replays per bucket."""

    def __init__(self) -> None:
        super().__init__()
        self.used: Counter[tuple[int, int]] = Counter()

    def capture(self, fn, bucket):
        fn()
        inner = super().capture(fn, bucket)

        def replay():
            self.used[bucket] += 1
            return inner()

        return replay


class Failing(Recording):
    """Raises for the chosen buckets after the warm-up ran (out of memory for the first one,
    another error for the rest), as a CUDA capture failing halfway would."""

    def __init__(self, fail: list[tuple[int, int]]) -> None:
        super().__init__()
        self.fail = list(fail)
        self.attempts: Counter[tuple[int, int]] = Counter()

    def capture(self, fn, bucket):
        if bucket in self.fail:
            self.attempts[bucket] += 1
            fn()
            if bucket == self.fail[0]:
                raise torch.OutOfMemoryError(OOM)
            raise RuntimeError(f"operation not permitted when stream is capturing {bucket}")
        return super().capture(fn, bucket)


def _logged(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def _think(*parts: str) -> str:
    return "<Think>\n" + "".join(parts) + "</Think>\n\nAnswer: 7"


FORK = _think("first\n", block([("1", "a b c d e f g h"), ("2", "x"), ("3", "y z")]), "after\n")
INNER = block([("1.1", "bottom a"), ("1.2", "side b c")])
NESTED = _think(block([("1", "deep\n" + INNER), ("2", "flat")]))


def _mixed():
    texts = [FORK, NESTED, None, None, FORK]
    params = []
    for i, text in enumerate(texts):
        kw = dict(max_tokens=120, logprobs=True, seed=11 + i)
        params.append(SamplingParams(temperature=0.8, top_p=0.95, **kw) if text is None
                      else SamplingParams(temperature=0.0, forced_output=text, **kw))  # fmt: skip
    return [f"Question {i}: {i} + {i}?" for i in range(len(texts))], params


CFG = dict(num_kv_slots=4096, graph_max_batch=8, graph_max_kv=512)  # buckets 1, 2, 4, 8 x 256, 512


def _static(pair, tok, capturer):
    llm = engine(pair[1], tok, static_decode=True, graph_capturer=capturer, **CFG)
    llm.runner.cascade = False  # cascade steps would run eagerly
    return llm


def test_a_bucket_whose_capture_fails_runs_eagerly_with_the_same_tokens(pair, tok, caplog):
    prompts, params = _mixed()
    ref = engine(pair[1], tok, **CFG).generate(prompts, params)  # eager
    recording = Recording()
    full = _static(pair, tok, recording)
    all_graphs = full.generate(prompts, params)
    used = sorted(recording.used)
    assert len(used) >= 2, used  # the run goes through several buckets
    fail = used[::2]  # every other bucket the run uses fails to capture
    failing = Failing(fail)
    llm = _static(pair, tok, failing)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = llm.generate(prompts, params)
    for a, b, c in zip(got, all_graphs, ref, strict=True):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.position_ids == b.position_ids == c.position_ids
        assert a.forced == b.forced == c.forced
        assert a.finish_reason == b.finish_reason == c.finish_reason
        pairs = zip(a.logprobs, c.logprobs, strict=True)
        assert max(abs(x - y) for x, y in pairs if x is not None) < 1e-5
        check_output(pair[0], tok, a)
    graphs = llm.runner.graphs
    assert set(graphs.failed) == set(fail) and not set(failing.used) & set(fail)  # never replayed
    # the other buckets kept their graphs
    assert 0 < llm.runner.static_steps < full.runner.static_steps
    assert all(failing.attempts[b] == 1 for b in fail)  # a failed bucket is not tried again
    warned = _logged(caplog, logging.WARNING)
    assert len(warned) == len(fail)  # one warning per failed bucket, naming it and the cause
    for i, (b, n) in enumerate(fail):
        (msg,) = [m for m in warned if f"batch {b} x K/V {n}: capture failed" in m]
        assert "run eagerly" in msg
        cause = "OutOfMemoryError: " + OOM if i == 0 else "RuntimeError: operation not permitted"
        assert cause in msg
    assert_no_leak(llm)


def test_capture_all_reports_time_memory_and_the_failed_buckets(pair, caplog):
    model = pair[1]
    pool = KVPool.for_model(model, 301)  # slot 300: scratch
    before = pool.kv.clone()
    failing = Failing([(4, 300), (2, 256)])
    graphs = DecodeGraphs(model, pool.kv, 300, max_batch=4, max_kv=300, capturer=failing)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = graphs.capture_all()
        graphs.capture_all()  # again: the failures are remembered, not warned about twice
    assert (report.buckets, report.captured, failing.captures) == (6, 4, 4)
    assert set(report.failed) == {(4, 300), (2, 256)}
    assert "OutOfMemoryError" in report.failed[(4, 300)]
    assert report.seconds > 0 and report.device_bytes == 0  # no CUDA here: the static buffers only
    ints = 4 * (1 + 2 + 4) * 8  # [4, B] long per batch bucket
    assert report.static_bytes == report.held_bytes == 4 * 300 * 8 + 4 * model.vocab_size * 4 + ints
    line = _logged(caplog, logging.INFO)[0]
    assert "captured 4 of 6 buckets (batch 1..4, K/V 256..300)" in line
    assert f"they hold {report.held_bytes / 1024:.1f} KiB" in line
    assert "2 run eagerly" in line and "2x256, 4x300" in line
    assert len(_logged(caplog, logging.WARNING)) == 2
    # the warm-ups and the failed captures touched no live slot
    assert torch.equal(pool.kv[:, :300], before[:, :300])
    rows, parts = [(5, 0, 0)] * 3, [[[0]]] * 3
    assert graphs.run(rows, [[list(range(280))]] * 3) is None  # bucket (4, 300): eager
    assert graphs.run(rows, parts) is not None and failing.used[(4, 256)] == 1  # (4, 256) replays
    assert len(_logged(caplog, logging.WARNING)) == 2


def test_buckets_never_exceed_what_the_pool_and_the_step_budget_can_fill(pair, tok):
    assert bucket_limits(300, 2048) == (64, 300)  # K/V lists hold distinct pool slots
    assert bucket_limits(10**6, 16) == (16, 16384)  # a step schedules at most 16 tokens
    assert bucket_limits(40, 2048, 128, 100_000) == (40, 40)  # explicit limits are capped too
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="graph_max_batch must be a positive integer"):
            bucket_limits(300, 16, bad)
    llm = engine(pair[1], tok, static_decode=True, graph_capturer=EagerCapturer(), num_kv_slots=300,
                 max_batch_tokens=16, graph_max_kv=100_000)  # fmt: skip
    graphs = llm.runner.graphs
    assert graphs.batch_buckets == batch_buckets(16) == [1, 2, 4, 8, 16]
    assert graphs.kv_buckets == [256, 300]
    assert graphs.capture_all().captured == 10  # not 11 x 7 = 77 up to 64 x 16384
    assert graphs.kv_flat.numel() == 16 * 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    hf, _ = tiny_pair(tok)
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cuda_graphs_false_and_the_cli_flag_turn_graphs_off(pair, tok, model_dir, monkeypatch, capsys):  # fmt: skip
    llm = engine(pair[1], tok, cuda_graphs=False, num_kv_slots=256)
    assert llm.runner.graphs is None and llm.runner.pool.num_slots == 256  # no scratch slot either
    p = argparse.ArgumentParser()
    add_device_arguments(p)  # shared by generate, serve and eval
    assert p.parse_args(["--no-cuda-graphs"]).cuda_graphs is False
    assert p.parse_args([]).cuda_graphs is None
    seen: list[object] = []

    class Recorder(multiverse.LLM):
        def __init__(self, *args, **config):
            seen.append(config.get("cuda_graphs", "absent"))
            super().__init__(*args, **config)

    monkeypatch.setattr(multiverse, "LLM", Recorder)
    argv = ["generate", "--model", str(model_dir), "--no-cuda-graphs", "--max-tokens", "2", "hi"]
    assert main(argv) == 0, capsys.readouterr().err
    # (without the flag nothing is passed: the eval tests' stand-in engines take no cuda_graphs)
    assert seen == [False]
