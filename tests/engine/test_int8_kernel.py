"""The compiled int8 matrix-vector kernel (multiverse.engine.model.int8_kernel) against
``QuantLinear.reference``, the 1-4 row dispatch to it, and its fallback when it cannot be built."""

from __future__ import annotations

import warnings

import pytest
import torch

from multiverse.engine.model import int8_kernel
from multiverse.engine.model.quant import QuantLinear

pytestmark = pytest.mark.skipif(not int8_kernel.supported(), reason="the kernel needs AVX-512")


@pytest.fixture
def kernel():
    fn = int8_kernel.load()
    assert fn is not None, "the kernel did not build on an AVX-512 machine"
    return fn


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (33, 200), (96, 576)])  # 200: a K % 16 tail
def test_kernel_matches_reference_within_float32_rounding(
    kernel, rows: int, n: int, k: int
) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    q = QuantLinear("int8", torch.randn(n, k, generator=gen) * 0.05)
    x = torch.randn(rows, k, generator=gen)
    out = int8_kernel.matvec(kernel, x, q.qweight, q.scales)
    exact = (x.double() @ q.dequantize().double().t()).float()
    assert out.shape == (rows, n) and out.dtype == torch.float32
    # float32 sums of k products: a few ulps of the sum of |terms|, far below bfloat16's 2^-8
    bound = 1e-6 * k * (x.abs().double() @ q.dequantize().abs().double().t()).float()
    assert ((out - exact).abs() <= bound).all()
    assert torch.allclose(
        out, q.reference(x), rtol=1e-5, atol=1e-5 * q.reference(x).abs().max().item()
    )


def test_kernel_refuses_bad_input(kernel) -> None:
    q = QuantLinear("int8", torch.randn(16, 32))
    with pytest.raises(ValueError, match="at most 4 rows"):
        int8_kernel.matvec(kernel, torch.randn(5, 32), q.qweight, q.scales)
    with pytest.raises(ValueError, match="float32"):
        int8_kernel.matvec(kernel, torch.randn(1, 32, dtype=torch.bfloat16), q.qweight, q.scales)


@pytest.mark.parametrize("rows", [1, 4, 5])
def test_quant_linear_takes_the_kernel_up_to_four_rows_on_one_thread(kernel, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    q = QuantLinear("int8", torch.randn(96, 192, generator=gen) * 0.05)
    x = torch.randn(rows, 192, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = q(x)
        torch.set_num_threads(2)
        two_threads = q(x)
    finally:
        torch.set_num_threads(threads)
    compiled = int8_kernel.matvec(kernel, x, q.qweight, q.scales) if rows <= 4 else None
    torch_kernel = q.nibble_forward(x.bfloat16()).float() if rows <= 4 else None
    if rows <= 4:
        assert torch.equal(one_thread, compiled) and torch.equal(two_threads, torch_kernel)
    else:
        assert torch.equal(one_thread, two_threads)  # the int8 kernel at either thread count


def test_build_reports_the_compiler_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="failed"):
        int8_kernel.build(cc="false", directory=tmp_path)
    with pytest.raises(RuntimeError, match="no C compiler"):
        int8_kernel.build(cc="no-such-compiler-xyz", directory=tmp_path)


def test_failed_build_warns_once_and_the_torch_kernels_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setenv("MULTIVERSE_KERNEL_CACHE", str(tmp_path))
    int8_kernel.reset()
    try:
        with pytest.warns(RuntimeWarning, match="int8 matvec kernel unavailable.*no C compiler"):
            assert int8_kernel.load() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second load (each QuantLinear) stays quiet
            q = QuantLinear("int8", torch.randn(96, 192) * 0.05)
            x = torch.randn(2, 192)
            assert torch.equal(q(x), q.nibble_forward(x.bfloat16()).float())
    finally:
        int8_kernel.reset()  # later tests load the real kernel again
