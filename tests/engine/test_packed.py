"""The float32 fast path of the linear layers (multiverse.engine.model.packed: oneDNN with a
packed weight) against its reference, ``F.linear`` (``CausalLM.set_linear_kernel("torch")``):
the kernel alone, a model's logits, the engine's greedy tokens, and the packed copy following
the weights when they change."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multiverse import LLM, SamplingParams
from multiverse.engine.loader import load_model
from multiverse.engine.model.packed import PackedLinear, onednn_available

TINY = Path(__file__).resolve().parents[2] / "models" / "multiverse-tiny"
F32_REL = 1e-5  # the same float32 products, summed in another order

pytestmark = pytest.mark.skipif(
    not onednn_available(torch.float32, torch.device("cpu")), reason="torch built without oneDNN"
)


@pytest.fixture(scope="module")
def tiny():
    model, tok, _ = load_model(TINY)
    return model, tok


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _packed_kinds(model) -> set[type]:
    layers, head = model._weights()
    return {type(getattr(w, n)) for w in layers for n in ("qkv_weight", "down_weight")} | {
        type(head)
    }


@pytest.mark.parametrize("rows", [1, 5, 16, 64])
@pytest.mark.parametrize("shape", [(96, 128), (960, 576), (40, 24)])
def test_packed_linear_matches_f_linear(rows: int, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=gen) * 0.05
    x = torch.randn(rows, shape[1], generator=gen)
    p = PackedLinear(w)
    with torch.inference_mode():
        fast = p.forward(x)
        strided = p.forward(torch.randn(rows, 2 * shape[1], generator=gen)[:, ::2])
    assert fast.shape == (rows, shape[0]) and fast.dtype == torch.float32
    assert _rel(fast, F.linear(x, w)) < F32_REL
    assert _rel(fast, p.reference(x)) < F32_REL
    assert strided.shape == (rows, shape[0])
    assert p.forward(x[:0]).shape == (0, shape[0])


def test_packed_linear_refuses_other_weights() -> None:
    with pytest.raises(ValueError, match="float32 CPU weight"):
        PackedLinear(torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2-D"):
        PackedLinear(torch.zeros(4))


def test_model_logits_match_the_reference_kernel(tiny) -> None:
    model, _ = tiny
    ref = copy.copy(model).set_linear_kernel("torch")
    ids = torch.arange(3, 60)
    with torch.inference_mode():
        fast, slow = model.forward_full(ids), ref.forward_full(ids)
    assert model.linear_kernel == "onednn"
    assert _packed_kinds(model) == {PackedLinear}  # the fast path really ran
    assert not _packed_kinds(ref) & {PackedLinear}
    assert _rel(fast, slow) < 10 * F32_REL
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


def test_engine_greedy_tokens_identical_to_the_reference_kernel(tiny) -> None:
    model, tok = tiny
    ref = copy.copy(model).set_linear_kernel("torch")
    prompts = ["1+2=", "Hello there", "count: 1 2 3", "a b c d e f"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)
    fast = LLM.from_model(model, tok).generate(prompts, params)
    slow = LLM.from_model(ref, tok).generate(prompts, params)
    assert _packed_kinds(model) == {PackedLinear}
    for a, b in zip(fast, slow, strict=True):
        assert list(a.token_ids) == list(b.token_ids)
        assert a.logprobs is not None and b.logprobs is not None
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_packed_copy_follows_weight_changes(tiny) -> None:
    model, _ = tiny
    model = copy.deepcopy(model)  # this test writes weights
    ids = torch.arange(3, 30)
    with torch.inference_mode():
        before = model.forward_full(ids)
        with torch.no_grad():  # in place, as loading a checkpoint does
            model.layers[2].gate_up_weight.mul_(1.5)
            model.embed[5:9].zero_()  # the (tied) LM head
        after = model.forward_full(ids)
        ref = copy.copy(model).set_linear_kernel("torch").forward_full(ids)
    assert _rel(after, before) > 1e-3
    assert _rel(after, ref) < 10 * F32_REL
    with torch.no_grad():  # a new tensor in place of the old one
        model.layers[0].down_weight = torch.nn.Parameter(
            model.layers[0].down_weight * -1, requires_grad=False
        )
    model._refresh_weight_cache()
    with torch.inference_mode():
        again = model.forward_full(ids)
        ref = copy.copy(model).set_linear_kernel("torch").forward_full(ids)
    assert _rel(again, ref) < 10 * F32_REL and _rel(again, after) > 1e-3
    with torch.inference_mode():  # weights made in inference mode (e.g. .to() there)
        model.to(torch.float64).to(torch.float32)
        assert model.layers[0].down_weight.is_inference()
        assert _rel(model.forward_full(ids), ref) < 10 * F32_REL


def test_storage_shared_and_quantize_after_packing(tiny) -> None:
    model, _ = tiny
    model = copy.deepcopy(model)
    fresh = copy.deepcopy(model)
    ids = torch.arange(3, 20)
    with torch.inference_mode():
        before = model.forward_full(ids)
    layers, head = model._weights()
    w = model.layers[1].qkv_weight
    assert w.t().is_contiguous()  # stored transposed; the one-row kernel reads it in place
    assert layers[1].qkv_weight.wt.data_ptr() == w.data_ptr()
    assert model.embed.is_contiguous() and head.wt.data_ptr() != model.embed.data_ptr()
    with torch.inference_mode():  # the values did not move: logits as before, reference too
        assert torch.equal(model.forward_full(ids), before)
    q, q_fresh = copy.deepcopy(model).quantize_("int8"), fresh.quantize_("int8")
    for a, b in zip(q.layers, q_fresh.layers, strict=True):
        assert torch.equal(a.qkv_weight.qweight, b.qkv_weight.qweight)
        assert torch.equal(a.down_weight.scales, b.down_weight.scales)
    with torch.inference_mode():
        assert torch.equal(q.forward_full(ids), q_fresh.forward_full(ids))


def test_deepcopy_and_other_dtypes(tiny) -> None:
    model, _ = tiny
    ids = torch.arange(3, 20)
    with torch.inference_mode():
        base = model.forward_full(ids)  # packed
        copied = copy.deepcopy(model)
        assert copied._packed is None  # not copied: packed again from the copy's weights
        assert _rel(copied.forward_full(ids), base) < F32_REL
        half = copy.deepcopy(model).to(torch.bfloat16)  # oneDNN path is float32 only
        half.forward_full(ids)
    assert not _packed_kinds(half) & {PackedLinear}
    with pytest.raises(ValueError, match="linear kernel 'mkl'"):
        model.set_linear_kernel("mkl")
