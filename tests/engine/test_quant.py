"""Weight-only int8 / int4 (multiverse.engine.model.quant): the fast kernels against their
reference (dequantise, then a float32 matmul), the quantisation error bounds, a quantised model
against its dequantised float32 copy, the engine option, and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from multiverse import LLM, SamplingParams
from multiverse.engine.loader import load_model
from multiverse.engine.model.quant import QuantLinear, check_quantization

TINY = Path(__file__).resolve().parents[2] / "models" / "multiverse-tiny"
BF16_REL = 2.0**-7  # activations and outputs rounded to bfloat16 on the fast path (plus sums)
TIE_GAP = 2.0**-6  # a token that is not the reference's argmax: only by this share of max |logit|


@pytest.fixture(scope="module")
def tiny():
    model, tok, _ = load_model(TINY)
    return model, tok


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_fast_path_matches_reference(method: str, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(rows, 128, generator=gen)
    q = QuantLinear(method, w, group_size=32)
    fast, ref = q(x), q.reference(x)
    assert fast.dtype == torch.float32 and fast.shape == (rows, 96)
    assert _rel(fast, ref) < BF16_REL
    # and the reference is the dequantised weight's float32 product, near the original's
    assert torch.allclose(ref, x @ q.dequantize().t(), atol=1e-5)
    assert _rel(ref, x @ w.t()) < (0.01 if method == "int8" else 0.1)


def test_int8_nibble_planes_are_the_int8_weight_exactly() -> None:
    """int8 on the int4 kernel (two 4-bit planes, ``[x, x]``): each weight the kernel reads back
    (one-hot rows) is ``q * scale`` rounded once to bfloat16, as the dequantised weight is."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    q = QuantLinear("int8", w)
    assert q.nibbles is not None and q.nibble_group == 128
    eye = torch.eye(128, dtype=torch.bfloat16)
    assert torch.equal(q.nibble_forward(eye), q.dequantize().t().to(torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_int8_small_batches_take_the_nibble_kernel(rows: int) -> None:
    """Up to NIBBLE_MAX_ROWS rows the int8 fast path on torch's kernels (on two threads: the
    compiled one-thread kernel of test_cpu_kernels.py is not used) is the nibble kernel, from
    there the int8 kernel; both match the reference, and each other up to a bfloat16 rounding."""
    from multiverse.engine.model.quant import NIBBLE_MAX_ROWS

    gen = torch.Generator().manual_seed(rows)
    q = QuantLinear("int8", torch.randn(96, 192, generator=gen) * 0.05)
    x = torch.randn(rows, 192, generator=gen)
    xk = x.to(torch.bfloat16)
    nibble = q.nibble_forward(xk).float()
    int8 = torch._weight_int8pack_mm(xk, q.qweight, q.kernel_scales).float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fast = q(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fast, nibble if rows <= NIBBLE_MAX_ROWS else int8)
    assert _rel(nibble, q.reference(x)) < BF16_REL and _rel(int8, q.reference(x)) < BF16_REL
    assert torch.allclose(nibble, int8, rtol=2.0**-7, atol=0)


def test_int8_without_nibble_planes_uses_the_int8_kernel() -> None:
    """Shapes the int4 kernel refuses (N % 16, no group size dividing K) keep the int8 kernel."""
    for n, k in ((40, 64), (48, 80)):
        q = QuantLinear("int8", torch.randn(n, k, generator=torch.Generator().manual_seed(n)))
        x = torch.randn(1, k)
        assert q.nibbles is None and _rel(q(x), q.reference(x)) < BF16_REL
        with pytest.raises(ValueError, match="no nibble planes"):
            q.nibble_forward(x.to(torch.bfloat16))


def test_dequantize_error_bounds() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q8 = QuantLinear("int8", w)
    step8 = q8.scales[:, None]
    assert ((q8.dequantize() - w).abs() <= step8 / 2 * 1.01).all()
    assert q8.qweight.dtype == torch.int8 and q8.qweight.shape == (32, 64)
    q4 = QuantLinear("int4", w, group_size=32)
    step4 = q4.scales.repeat_interleave(32, dim=1)
    assert q4.qweight.shape == (32, 32) and q4.qweight.dtype == torch.uint8  # two a byte
    assert ((q4.dequantize() - w).abs() <= step4 * 0.51).all()  # half a step (+ bf16 zeros)
    # a row already on a 16-level grid per group (a GGUF Q4_1 block) requantises exactly
    grid = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(1)).float()
    grid[:, ::32], grid[:, 1::32] = 0, 15  # every group spans the full range
    exact = grid * 0.25 - 1.0
    assert torch.equal(QuantLinear("int4", exact, group_size=32).dequantize(), exact)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_matches_its_dequantized_reference(tiny, method: str) -> None:
    model, _ = tiny
    q = copy.deepcopy(model).quantize_(method)
    assert q.quantization == method
    kinds = {type(getattr(layer, n)) for layer in q.layers for n in ("qkv_weight", "down_weight")}
    assert kinds == {QuantLinear} and type(q.lm_head_weight) is QuantLinear
    assert q.lm_head_q is not None and q.lm_head_q.method == "int8"  # the head is int8 in both
    ref = q.dequantized()
    assert ref.quantization is None and isinstance(ref.lm_head_weight, torch.nn.Parameter)
    ids = torch.arange(3, 40)
    with torch.inference_mode():
        fast, slow, f32 = q.forward_full(ids), ref.forward_full(ids), model.forward_full(ids)
    assert _rel(fast, slow) < 4 * BF16_REL  # 6 layers of bf16-rounded activations
    assert _rel(slow, f32) < (0.02 if method == "int8" else 0.2)  # the quantisation itself
    with pytest.raises(ValueError, match="already quantised"):
        q.quantize_("int8")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_option_greedy_matches_dequantized_reference(tiny, method: str) -> None:
    """LLM(quantization=...) decodes (batched, with the KV pool) the argmax of its reference
    model's full-sequence forward, up to near-ties of bfloat16 rounding."""
    _, tok = tiny
    llm = LLM(str(TINY), quantization=method)
    assert llm.model.quantization == method
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(["1+2=", "Hello there", "count: 1 2 3"], params)
    ref = llm.model.dequantized()
    checked = ties = 0
    for out in outs:
        full = torch.tensor(list(out.prompt_token_ids) + list(out.token_ids))
        with torch.inference_mode():
            rows = ref.forward_full(full)[len(out.prompt_token_ids) - 1 : -1]
        for row, token in zip(rows, out.token_ids, strict=True):
            checked += 1
            gap = float(row.max() - row[token])
            ties += gap > 0
            assert gap < TIE_GAP * float(row.abs().max()), (method, checked, gap, row.abs().max())
    assert checked == 72 and ties <= checked // 8


def test_refusals(tiny) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="quant_group_size=64 does not divide its 96"):
        QuantLinear("int4", torch.randn(16, 96), group_size=64, name="layers.0.o_weight")
    with pytest.raises(ValueError, match="multiple of 16 output features"):
        QuantLinear("int4", torch.randn(40, 64), group_size=32)
    with pytest.raises(ValueError, match="one of \\(32, 64, 128, 256\\)"):
        check_quantization("int4", "cpu", 48)
    with pytest.raises(ValueError, match="expected None, 'int8' or 'int4'"):
        check_quantization("int3", "cpu")
    with pytest.raises(ValueError, match="CPU only"):
        LLM(str(TINY), device="cuda", quantization="int8")  # refused before anything loads
    with pytest.raises(ValueError, match="does not divide its 96 input features"):
        copy.deepcopy(model).quantize_("int4", 64)
    with pytest.raises(ValueError, match="needs a quantised model"):
        model.dequantized()


def test_cli_quantization_option(tiny, capsys) -> None:
    """``--quantization`` (one definition in cli/common.py) on generate/serve/eval/demo; generate
    decodes what ``LLM(quantization=...)`` decodes."""
    from multiverse.cli import build_parser, main

    parser = build_parser()
    required = {"generate": ["x"], "eval": ["--model", "m", "--benchmark", "b"]}
    for command in ("generate", "serve", "eval", "demo"):
        args = parser.parse_args([command, "--quantization", "int4", *required.get(command, [])])
        assert args.quantization == "int4", command
    prompt, params = "Hello there", SamplingParams(temperature=0.0, max_tokens=8, parallel=False)
    argv = [
        "generate",
        "--model",
        str(TINY),
        "--max-tokens",
        "8",
        "--json",
        "--no-parallel",
        "--raw",
    ]
    assert main([*argv, "--quantization", "int4", prompt]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs"][0]["text"]
    want = LLM(str(TINY), quantization="int4").generate([prompt], params)[0].text
    assert got == want
    assert LLM(str(TINY)).generate([prompt], params)[0].text != want  # the option is not ignored
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--quantization", "int3", "x"])
