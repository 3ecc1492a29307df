"""The fused small-op kernels of a float32 CPU step (multiverse.engine.model.cpu_fused) against
torch's ops (the reference, ``CausalLM.set_fused_ops(False)``): each kernel alone, a model's
decode logits, the engine's greedy tokens and log-probabilities, and the fallbacks."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multiverse import LLM, SamplingParams
from multiverse.engine.loader import load_model
from multiverse.engine.model import ForwardBatch, KVPool, cpu_fused, cpu_kernels
from multiverse.engine.model.rope import apply_rope_, rope_table

TINY = Path(__file__).resolve().parents[2] / "models" / "multiverse-tiny"
pytestmark = pytest.mark.skipif(not cpu_kernels.supported(), reason="the kernels need AVX-512")


@pytest.fixture
def fn():
    lib = cpu_fused.load()
    assert lib is not None, "the fused kernels did not build on an AVX-512 machine"
    return lib


@pytest.fixture(scope="module")
def tiny():
    model, tok, _ = load_model(TINY)
    return model, tok


@pytest.mark.parametrize(("rows", "hidden"), [(1, 576), (5, 40), (16, 24)])  # 40, 24: tails
def test_add_rms_norm_matches_add_then_f_rms_norm(fn, rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, delta = torch.randn(2, rows, hidden, generator=gen).unbind(0)
    x, delta, w = x.contiguous(), delta.contiguous(), torch.randn(hidden, generator=gen)
    x0 = x.clone()
    out = cpu_fused.add_rms_norm(fn, x, delta, w, 1e-5)
    assert torch.equal(x, x0 + delta)  # the residual add is exact
    torch.testing.assert_close(out, F.rms_norm(x0 + delta, (hidden,), w, 1e-5))
    plain = cpu_fused.add_rms_norm(fn, x0.clone(), None, w, 1e-5)
    torch.testing.assert_close(plain, F.rms_norm(x0, (hidden,), w, 1e-5))


@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (7, 40)])
def test_silu_mul_matches_torch(fn, rows: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -30.0])  # exp's clamped range
    want = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    torch.testing.assert_close(cpu_fused.silu_mul(fn, gate_up), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("d", [24, 64, 8])  # 16 floats a vector: a masked tail, whole, short
def test_rope_store_rotates_q_k_in_place_and_writes_k_v_at_the_slots(fn, d: int) -> None:
    hq, hk, t, slots_n = 4, 2, 3, 10
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    rope = rope_table(torch.tensor([0, 7, 300]), inv_freq, 1.0, torch.float32)
    want = qkv.clone()
    apply_rope_(want[:, : (hq + hk) * d], rope)
    pool = torch.zeros(slots_n, 2, hk, d)
    slots = torch.tensor([9, 2, 5])
    cs = torch.view_as_real(rope).contiguous()
    fn.rope_store(qkv.data_ptr(), cs.data_ptr(), slots.data_ptr(), pool.data_ptr(), t,
                  qkv.shape[1], hq + hk, hq, 2 * hk * d, d)  # fmt: skip
    torch.testing.assert_close(qkv, want)
    assert torch.equal(pool[slots].reshape(t, -1), qkv[:, hq * d :])
    untouched = [i for i in range(slots_n) if i not in slots.tolist()]
    assert not pool[untouched].any()


def _decode_batches(model, pool_slots: int = 96):
    gen = torch.Generator().manual_seed(0)
    lens = [3, 11, 6, 1]
    slots = torch.randperm(pool_slots, generator=gen)
    owned = [slots[24 * i : 24 * i + 24] for i in range(len(lens))]
    ids = [torch.randint(0, model.vocab_size, (n,), generator=gen) for n in lens]
    prefill = ForwardBatch(torch.cat(ids), torch.cat([torch.arange(n) for n in lens]),
                           torch.cat([o[:n] for o, n in zip(owned, lens)]), lens,
                           [o[:n] for o, n in zip(owned, lens)], [None] * len(lens))  # fmt: skip
    return prefill, lens, owned


def test_model_steps_match_the_torch_ops(tiny, fn) -> None:
    """Prefill of 4 ragged sequences, then 6 greedy decode steps: fused and reference pick the
    same tokens, log-probabilities within 1e-4, and the pools hold the same K/V."""
    model, _ = tiny
    ref = copy.copy(model).set_fused_ops(False)
    prefill, lens, owned = _decode_batches(model)
    pools = {m: KVPool.for_model(model, 96) for m in ("fused", "ref")}
    models = {"fused": model, "ref": ref}
    assert cpu_fused.usable(model, pools["fused"].kv) is fn
    assert cpu_fused.usable(ref, pools["ref"].kv) is None
    with torch.inference_mode():
        logp = {m: models[m](prefill, pools[m]).log_softmax(-1) for m in models}
        torch.testing.assert_close(logp["fused"], logp["ref"], atol=1e-4, rtol=0)
        nxt = logp["ref"].argmax(-1)
        assert torch.equal(logp["fused"].argmax(-1), nxt)
        for step in range(6):
            pos = torch.tensor([n + step for n in lens])
            batch = ForwardBatch(nxt, pos, torch.stack([o[p] for o, p in zip(owned, pos)]),
                                 [1] * len(lens), [o[: p + 1] for o, p in zip(owned, pos)],
                                 [None] * len(lens))  # fmt: skip
            logp = {m: models[m](batch, pools[m]).log_softmax(-1) for m in models}
            torch.testing.assert_close(logp["fused"], logp["ref"], atol=1e-4, rtol=0)
            nxt = logp["ref"].argmax(-1)
            assert torch.equal(logp["fused"].argmax(-1), nxt)
    torch.testing.assert_close(pools["fused"].kv, pools["ref"].kv, atol=1e-5, rtol=1e-5)


def test_engine_greedy_tokens_identical_to_the_torch_ops(tiny, fn) -> None:
    model, tok = tiny
    ref = copy.copy(model).set_fused_ops(False)
    prompts = ["1+2=", "Hello there", "count: 1 2 3", "a b c d e f"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)
    fast = LLM.from_model(model, tok).generate(prompts, params)
    slow = LLM.from_model(ref, tok).generate(prompts, params)
    for a, b in zip(fast, slow, strict=True):
        assert list(a.token_ids) == list(b.token_ids)
        assert a.logprobs is not None and b.logprobs is not None
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_slots_outside_the_pool_are_refused(tiny, fn) -> None:
    model, _ = tiny
    prefill, _, _ = _decode_batches(model)
    with torch.inference_mode(), pytest.raises(ValueError, match="outside the pool"):
        model(prefill, KVPool.for_model(model, 20))  # slots up to 95


def test_torch_ops_run_on_more_threads_and_other_dtypes(tiny, fn) -> None:
    model, _ = tiny
    pool = KVPool.for_model(model, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_fused.usable(model, pool.kv) is fn
        torch.set_num_threads(2)
        assert cpu_fused.usable(model, pool.kv) is None
    finally:
        torch.set_num_threads(threads)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert cpu_fused.usable(bf16, KVPool.for_model(bf16, 8).kv) is None


def test_failed_build_warns_once_and_the_torch_ops_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu_fused.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_fused.load(directory=tmp_path) is None
            assert cpu_fused.load(directory=tmp_path) is None
        assert len([w for w in caught if "fused CPU kernels unavailable" in str(w.message)]) == 1
    finally:
        cpu_fused.reset()
        monkeypatch.delenv("CC")
        cpu_fused.load()  # later tests use the real library


def test_argmax_equals_torch_with_ties_nan_and_infinities(fn) -> None:
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(8, 1000, generator=gen)  # 1000: a masked tail of 8
    scores[1, 17] = scores[1, 900] = 50.0  # a tie: the first wins
    scores[2, 999] = 60.0  # the maximum in the tail
    scores[3, 5], scores[3, 700] = 50.0, float("nan")  # a NaN counts as the largest
    scores[4] = float("-inf")  # every value -inf: index 0
    scores[5, 3] = float("inf")
    scores[6, 20:40] = 7.0  # equal maxima in several lanes
    want = scores.argmax(-1)
    assert want.tolist()[1:5] == [17, 999, 700, 0]
    assert torch.equal(cpu_fused.argmax(scores), want)
    assert torch.equal(cpu_fused.argmax(scores[:, :16]), scores[:, :16].argmax(-1))
