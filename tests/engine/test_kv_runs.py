"""K/V runs (:mod:`multiverse.engine.kv_manager`, Runs): sequences decoding side by side hold
consecutive pool slots, and slot numbers change no output. Tiny random Qwen2, CPU, invariants
after every step."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("transformers")

from _engine_util import assert_no_leak, block, engine, slot_breaks  # noqa: E402

from multiverse import SamplingParams  # noqa: E402


@pytest.mark.parametrize("run", [0, 64])
def test_requests_decoding_in_lockstep_hold_consecutive_slots(pair, tok, run):
    llm = engine(pair[1], tok, num_kv_slots=4096)
    llm.kv.run = run
    sp = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True, parallel=False)
    reqs = [llm.add_request([200 + i, 300 + i, 400 + i], sp) for i in range(8)]
    for _ in range(140):
        llm.step()
    for r in reqs:
        kv = r.root.kv
        assert len(kv) == 3 + 139
        if run:  # a run for the prompt and 64 more, then runs of 65
            assert slot_breaks(kv) <= 2, kv
        else:  # one slot each a step from one free list: 8 apart
            assert slot_breaks(kv) == len(kv) - 3
    while llm.has_unfinished():
        llm.step()
    assert_no_leak(llm)


def _requests(tok, rng: random.Random) -> list[tuple[list[int], SamplingParams]]:
    out = []
    for i in range(10):
        prompt = [200 + (i * 7 + k) % 250 for k in range(rng.randint(2, 12))]
        if i % 3 == 0:  # forks: the "model" writes a block
            paths = [(str(p), " ".join(rng.choice("abxyz") for _ in range(rng.randint(1, 8))))
                     for p in range(1, rng.randint(2, 4) + 1)]  # fmt: skip
            forced = tok.encode(
                "<Think>\n" + block(paths) + "</Think>\n\nAnswer: 1", add_special_tokens=False
            )
            sp = SamplingParams(
                temperature=0.0, max_tokens=len(forced) + 4, forced_output=forced, logprobs=True
            )
        else:
            seed = rng.randrange(1000) if i % 3 == 1 else None
            sp = SamplingParams(temperature=0.0 if seed is None else 1.0, seed=seed, logprobs=True,
                                max_tokens=rng.randint(20, 90), ignore_eos=True, parallel=i % 2 == 0)  # fmt: skip
        out.append((prompt, sp))
    return out


@pytest.mark.parametrize("slots", [4096, 150])
def test_slot_runs_change_no_output(pair, tok, slots):
    # the same requests with runs of 64 and one slot at a time, in a roomy pool and in one that
    # preempts and evicts: identical tokens, positions and logprobs (bit for bit: attention reads
    # a sequence's slots in its own order, whatever their numbers)
    reqs = _requests(tok, random.Random(5))
    outs, layouts = {}, {}
    for run in (0, 64):
        llm = engine(pair[1], tok, num_kv_slots=slots, max_batch_tokens=64, prefill_chunk=16)
        llm.kv.run = run
        added = [llm.add_request(p, sp) for p, sp in reqs]
        seen = []
        while llm.has_unfinished():
            llm.step()
            seen += [list(r.root.kv) for r in added if not r.finished and r.root.kv]
        outs[run] = [llm.output(r) for r in added]
        layouts[run] = sum(slot_breaks(kv) for kv in seen)
        assert_no_leak(llm)
        if slots < 4096:
            assert llm.scheduler.num_preemptions > 0
    for a, b in zip(outs[0], outs[64], strict=True):
        assert a.finish_reason == b.finish_reason != "kv_capacity"
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
        assert a.logprobs == b.logprobs
    assert sum(o.usage.blocks for o in outs[64]) > 0
    # the slots did differ: runs against interleaved (under pressure the reservations are split)
    assert layouts[64] < layouts[0] / (4 if slots == 4096 else 1.2)
