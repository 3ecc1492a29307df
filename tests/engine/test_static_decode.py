"""The fixed-shape decode step (the one CUDA graphs capture), driven on the CPU without CUDA:
its attention equals the reference, one step equals the reference forward, padding rows write
only the scratch slot, buckets are chosen as documented, and whole engine runs (forks, merges,
preemption, sampling, eager fallbacks) give the same tokens as the eager engine and one full
forward."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, check_output, engine  # noqa: E402

from multiverse import SamplingParams  # noqa: E402
from multiverse.engine.model import ForwardBatch, KVPool, reference_attention  # noqa: E402
from multiverse.engine.model.attention.static import StaticDecodePlan, slot_table  # noqa: E402
from multiverse.engine.model.graphs import (  # noqa: E402
    DecodeGraphs,
    EagerCapturer,
    batch_buckets,
    kv_buckets,
    pick,
)


def _think(*parts: str) -> str:
    return "<Think>\n" + "".join(parts) + "</Think>\n\nAnswer: 7"


UNEVEN = _think("first\n", block([("1", "a b c d e f g h"), ("2", "x"), ("3", "y z")]), "after\n")
NESTED = _think(block([
    ("1", "deep\n" + block([("1.1", "bottom a"), ("1.2", "side b c")])),
    ("2", "flat"),
]), "then\n", block([("1", "again"), ("2", "and again and again")]))  # fmt: skip


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(5) == [1, 2, 4, 5] and batch_buckets(1) == [1]
    assert kv_buckets(1000) == [256, 512, 1000] and kv_buckets(100) == [100]
    assert pick([1, 2, 4], 3) == 4 and pick([1, 2, 4], 4) == 4 and pick([1, 2, 4], 5) is None
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_slot_table_pads_with_the_scratch_slot():
    flat = torch.tensor([5, 6, 7, 1, 2, 99, 99, 99])
    table = slot_table(flat, torch.tensor([3, 2, 0, 0]), 4, scratch_slot=9)
    assert table.tolist() == [[5, 6, 7, 9], [1, 2, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]]


@pytest.mark.parametrize("fold_gqa", [False, True])
def test_static_plan_equals_reference_attention(fold_gqa):
    g = torch.Generator().manual_seed(0)
    slots, hk, hq, d, cols = 40, 2, 4, 8, 16
    pool = torch.randn(slots, 2, hk, d, generator=g)
    lists = [torch.randperm(39, generator=g)[:n] for n in (1, 7, 16)]
    lens = torch.tensor([len(x) for x in lists] + [0])  # one padding row
    flat = torch.cat(lists + [torch.zeros(64 - sum(map(len, lists)), dtype=torch.long)])
    plan = StaticDecodePlan.build(flat, lens, cols, 39, fold_gqa)
    q = torch.randn(4, hq * d, generator=g)
    out = plan.attend(q, torch.empty(4, 2, hk, d), pool)
    assert torch.isfinite(out).all()  # the padding row attends the scratch slot, not nothing
    for i, ix in enumerate(lists):
        kv = pool[ix]
        ref = reference_attention(q[i].view(1, hq, d), kv[:, 0], kv[:, 1], torch.ones(1, len(ix), dtype=torch.bool))
        torch.testing.assert_close(out[i], ref.view(-1), atol=1e-5, rtol=1e-5)


class _WarmupCapturer(EagerCapturer):
    """Runs the step at capture time, as a CUDA graph capture (warm-up + capture) does."""

    def capture(self, fn, bucket):
        fn()
        return super().capture(fn, bucket)


def test_one_static_step_equals_the_reference_forward_and_touches_no_live_slot(pair):
    model = pair[1]
    g = torch.Generator().manual_seed(1)
    pool = KVPool.for_model(model, 65)  # slot 64: scratch
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g))
    before = pool.kv.clone()
    capturer = _WarmupCapturer()
    graphs = DecodeGraphs(model, pool.kv, scratch_slot=64, max_batch=8, max_kv=32, capturer=capturer)
    perm = torch.randperm(64, generator=g).tolist()
    lists = [perm[0:5], perm[5:6], perm[6:30]]  # the last slot of each list is its new token's
    rows = [(7, 4, lists[0][-1]), (3, 0, lists[1][-1]), (11, 23, lists[2][-1])]
    # K/V lists given as a tensor piece plus a host tail, as the runner does
    parts = [[torch.tensor(x[:-2]), x[-2:]] if len(x) > 2 else [x] for x in lists]
    logits = graphs.run(rows, parts)
    assert graphs.bucket(3, 24) == (4, 32) and logits.shape == (3, model.vocab_size)
    assert capturer.captures == 1 and capturer.replays == 1
    new_slots = {r[2] for r in rows}
    changed = {s for s in range(65) if not torch.equal(pool.kv[:, s], before[:, s])}
    assert changed <= new_slots | {64} and new_slots <= changed  # padding wrote only the scratch slot
    ref_pool = KVPool.for_model(model, 65)
    ref_pool.kv.copy_(before)
    batch = ForwardBatch(
        torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
        torch.tensor([r[2] for r in rows]), [1, 1, 1], [torch.tensor(x) for x in lists], [None] * 3,
    )  # fmt: skip
    ref = model(batch, ref_pool, reference=True)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.kv[:, :64], ref_pool.kv[:, :64])
    assert graphs.run(rows, [[list(range(40))]] * 3) is None  # longer than the largest bucket


def _static(pair, tok, **cfg):
    capturer = _WarmupCapturer()  # buckets are captured mid-run: the warm-up must touch no live slot
    llm = engine(pair[1], tok, static_decode=True, graph_capturer=capturer, **cfg)
    return llm, capturer


def _mixed():
    texts = [UNEVEN, NESTED, None, None, UNEVEN]
    params = []
    for i, text in enumerate(texts):
        kw = dict(max_tokens=200, logprobs=True, seed=7 + i)
        if text is None:
            params.append(SamplingParams(temperature=0.8, top_k=40, top_p=0.95, **kw))
        else:
            params.append(SamplingParams(temperature=0.0, forced_output=text, **kw))
    return [f"Question {i}: {i} + {i}?" for i in range(len(texts))], params


@pytest.mark.parametrize("cfg", [
    dict(num_kv_slots=4096),
    dict(num_kv_slots=420, max_batch_tokens=64, prefill_chunk=16),  # preemption
    dict(num_kv_slots=4096, graph_max_batch=4, graph_max_kv=200),  # many steps fall back to eager
], ids=["roomy", "preempting", "small-buckets"])  # fmt: skip
def test_engine_with_static_decode_equals_the_eager_engine_and_the_full_forward(pair, tok, cfg):
    prompts, params = _mixed()
    ref = engine(pair[1], tok, **cfg).generate(prompts, params)
    llm, capturer = _static(pair, tok, **cfg)
    llm.runner.cascade = False  # cascade steps would run eagerly
    got = llm.generate(prompts, params)
    assert llm.runner.static_steps > 0 and capturer.replays == llm.runner.static_steps
    if "max_batch_tokens" in cfg:
        assert llm.scheduler.num_preemptions > 0
    for a, b in zip(got, ref, strict=True):
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids and a.forced == b.forced
        assert a.finish_reason == b.finish_reason
        check_output(pair[0], tok, a)
    # the scratch slot is the pool's extra slot: the allocator never hands it out
    assert llm.runner.pool.num_slots == llm.kv.num_slots + 1 == llm.runner.graphs.scratch_slot + 1
    assert_no_leak(llm)


def test_cascade_steps_fall_back_to_eager_with_the_same_result(pair, tok):
    sp = SamplingParams(temperature=0.0, max_tokens=300, forced_output=UNEVEN, logprobs=True)
    llm, _ = _static(pair, tok, num_kv_slots=2048)
    llm.runner.cascade, llm.runner.cascade_min_saved_rows = True, 0
    out = llm.generate(["Question: 3 + 4?"], sp)[0]
    assert out.text == UNEVEN and llm.runner.cascade_steps > 0
    check_output(pair[0], tok, out)
    assert_no_leak(llm)


def test_cuda_graphs_need_cuda(pair, tok):
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        engine(pair[1], tok, cuda_graphs=True)
    llm = engine(pair[1], tok)
    assert llm.runner.graphs is None and llm.runner.pool.num_slots == llm.kv.num_slots  # CPU default: eager
