"""The compiled int8 matrix-vector kernel (multiverse.engine.model.cpu_kernels), its AVX-512 and
AVX2 builds, against ``QuantLinear.reference``, the 1-16 row dispatch to it, and its fallback
when it cannot be built; the decode attention kernel (AVX-512)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from multiverse.engine.model import cpu_kernels
from multiverse.engine.model.quant import QuantLinear

avx512 = pytest.mark.skipif(not cpu_kernels.supported(), reason="the kernel needs AVX-512")
ISAS = [pytest.param("avx512", marks=avx512),
        pytest.param("avx2", marks=pytest.mark.skipif(cpu_kernels.cpu_isa() is None,
                                                      reason="the kernel needs AVX2"))]  # fmt: skip


@pytest.fixture
def kernel():
    fn = cpu_kernels.load()
    assert fn is not None, "the kernel did not build on an AVX-512 machine"
    return fn


@pytest.fixture(scope="module", params=ISAS)
def isa_kernel(request):
    """Each instruction set's build, loaded beside the process's own (the AVX2 one on an AVX-512
    CPU too: ``-mno-avx512f``)."""
    fn = cpu_kernels.open_library(cpu_kernels.build(isa=request.param))
    assert fn.kernel_isa() == {"avx512": 512, "avx2": 256}[request.param]
    return fn


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 12, 16])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (33, 200), (96, 576)])  # 200: a K % 16 tail
def test_kernel_matches_reference_within_float32_rounding(
    isa_kernel, rows: int, n: int, k: int
) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    q = QuantLinear("int8", torch.randn(n, k, generator=gen) * 0.05)
    x = torch.randn(rows, k, generator=gen)
    out = cpu_kernels.matvec(isa_kernel, x, q.qweight, q.scales)
    exact = (x.double() @ q.dequantize().double().t()).float()
    assert out.shape == (rows, n) and out.dtype == torch.float32
    # float32 sums of k products: a few ulps of the sum of |terms|, far below bfloat16's 2^-8
    bound = 1e-6 * k * (x.abs().double() @ q.dequantize().abs().double().t()).float()
    assert ((out - exact).abs() <= bound).all()
    assert torch.allclose(
        out, q.reference(x), rtol=1e-5, atol=1e-5 * q.reference(x).abs().max().item()
    )


def test_avx2_and_avx512_builds_agree_within_float32_rounding() -> None:
    """The same product from both builds (8 and 16 float32 lanes: only the order of the sums
    differs), at one row and at a batch."""
    if not cpu_kernels.supported():
        pytest.skip("both builds need an AVX-512 CPU")
    builds = [cpu_kernels.open_library(cpu_kernels.build(isa=i)) for i in ("avx512", "avx2")]
    gen = torch.Generator().manual_seed(7)
    q = QuantLinear("int8", torch.randn(160, 1536, generator=gen) * 0.05)
    for rows in (1, 7):
        x = torch.randn(rows, 1536, generator=gen)
        wide, narrow = (cpu_kernels.matvec(fn, x, q.qweight, q.scales) for fn in builds)
        assert not torch.equal(wide, torch.zeros_like(wide))
        torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-5 * wide.abs().max().item())


def test_on_an_avx2_cpu_int8_takes_the_avx2_build_and_attention_none() -> None:
    """torch told to run AVX2 (``ATEN_CPU_CAPABILITY=avx2``, a subprocess): the library loaded
    is the AVX2 build, the int8 fast path runs it (equal to a direct call), and the decode
    attention (AVX-512 only) sees no library, so torch's path runs."""
    if cpu_kernels.cpu_isa() is None:
        pytest.skip("needs an AVX2 CPU")
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from multiverse.engine.model import cpu_kernels\n"
        "from multiverse.engine.model.quant import QuantLinear\n"
        "q = QuantLinear('int8', torch.randn(48, 96) * 0.05)\n"
        "fn = cpu_kernels.int8_library()\n"
        "x = torch.randn(3, 96)\n"
        "assert torch.equal(q(x), cpu_kernels.matvec(fn, x, q.qweight, q.scales))\n"
        "print(cpu_kernels.cpu_isa(), fn.kernel_isa(), cpu_kernels.loaded())\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["avx2", "256", "None"]


def test_build_refuses_an_unknown_isa(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="no CPU kernels for isa='neon'"):
        cpu_kernels.build(directory=tmp_path, isa="neon")


@avx512
def test_kernel_refuses_bad_input(kernel) -> None:
    q = QuantLinear("int8", torch.randn(16, 32))
    with pytest.raises(ValueError, match="float32 x, int8 weight"):
        cpu_kernels.matvec(kernel, torch.randn(5, 31), q.qweight, q.scales)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.matvec(kernel, torch.randn(1, 32, dtype=torch.bfloat16), q.qweight, q.scales)
    with pytest.raises(ValueError, match="int8 weight"):
        cpu_kernels.matvec(kernel, torch.randn(1, 32), q.qweight.float(), q.scales)


@avx512
@pytest.mark.parametrize("rows", [1, 4, 5, 16, 17])
def test_quant_linear_takes_the_kernel_up_to_16_rows_on_one_thread(kernel, rows: int) -> None:
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
    xk = x.bfloat16()
    torch_kernel = (q.nibble_forward(xk) if rows <= 4
                    else torch._weight_int8pack_mm(xk, q.qweight, q.kernel_scales)).float()  # fmt: skip
    assert torch.equal(two_threads, torch_kernel)
    if rows <= cpu_kernels.MAX_ROWS:
        assert torch.equal(one_thread, cpu_kernels.matvec(kernel, x, q.qweight, q.scales))
    else:
        assert torch.equal(one_thread, two_threads)  # the int8 kernel at either thread count


@avx512
def test_decode_attention_refuses_slots_rows_and_segments_outside_their_lists(kernel) -> None:
    from multiverse.engine.model.attention.native import DecodeIndex, decode_attention

    pool = torch.randn(8, 2, 1, 16)
    q = torch.randn(2, 32)
    ok = DecodeIndex.per_sequence([torch.tensor([0, 1]), torch.tensor([2])])
    assert finite_2x32(decode_attention(kernel, q, pool, ok))
    assert ok.checked_slots == 8  # checked once for this pool size, not again per layer
    slots, segs, rows = ok.slots, ok.segments, ok.rows
    bad = [
        ("slots outside", torch.tensor([0, 8, 2]), segs, rows),
        ("slots outside", torch.tensor([0, -1, 2]), segs, rows),
        ("segment outside", slots, torch.tensor([[0, 2, 0, 1], [2, 4, 1, 2]]), rows),  # 4 > 3 slots
        ("row outside", slots, segs, torch.tensor([0, 2])),  # row 2 of 2
        ("attends no key", slots, torch.tensor([[0, 3, 0, 1], [3, 3, 1, 2]]), rows),
    ]
    for message, sl, sg, rw in bad:
        with pytest.raises(ValueError, match=message):
            decode_attention(kernel, q, pool, DecodeIndex(sl, sg, rw, 2))
    with pytest.raises(ValueError, match="head_dim <= 128"):
        decode_attention(kernel, torch.randn(2, 256), torch.randn(8, 2, 1, 256), ok)
    with pytest.raises(ValueError, match="float32"):
        decode_attention(kernel, q.bfloat16(), pool, ok)


@avx512
@pytest.mark.parametrize(
    ("hk", "g", "d"), [(3, 3, 64), (2, 2, 24), (1, 4, 128), (2, 1, 8), (1, 3, 32), (4, 1, 16)]
)
def test_one_pass_attention_over_many_blocks_equals_float64_softmax(kernel, hk, g, d) -> None:
    """Sequences of 1 to 700 keys (many L1 blocks each), scores spread over +-40 (the running
    max moves: the online softmax rescales), ungrouped and with a 300-key prefix shared by three
    rows: within float32 rounding of a float64 softmax over each row's keys. Heads of <= 32
    (8, 16, 24, 32) take the kernel's 16-keys-at-a-time scores, the others key by key."""
    from multiverse.engine.model.attention.native import DecodeIndex, decode_attention

    gen = torch.Generator().manual_seed(hk * 100 + d)
    pool = torch.randn(2400, 2, hk, d, generator=gen)
    pool[:, 0] *= torch.linspace(0.1, 6.0, 2400)[:, None, None]  # later keys score higher
    free = torch.randperm(2400, generator=gen)
    prefix = free[:300]
    lens = [1, 17, 700, 129, 64]
    own = [free[300 + 700 * i : 300 + 700 * i + n] for i, n in enumerate(lens)]
    members = [1, 3, 4]
    kv = [torch.cat([prefix, o]) if i in members else o for i, o in enumerate(own)]
    q = torch.randn(len(kv), hk * g * d, generator=gen) * 2
    expect = []
    for i, ix in enumerate(kv):
        k, v = pool[ix, 0].double(), pool[ix, 1].double()
        s = torch.einsum("hgd,lhd->hgl", q[i].view(hk, g, d).double(), k) * d**-0.5
        expect.append(torch.einsum("hgl,lhd->hgd", s.softmax(-1), v).reshape(-1))
    expect_t = torch.stack(expect)
    groups = [(prefix, members), *[(kv[i][:-1], [i]) for i in (0, 2)]]
    for index in (DecodeIndex.per_sequence(kv), DecodeIndex.grouped(kv, groups)):
        out = decode_attention(kernel, q, pool, index)
        assert (out.double() - expect_t).abs().max() < 2e-5


@avx512
def test_layer_attention_bound_once_equals_decode_attention_on_every_layer(kernel) -> None:
    """The step-bound call (checks once, one output buffer) gives decode_attention's values
    bit for bit on each layer's pool, reading the queries from a q/k/v row, and refuses a layer
    whose rows or pool differ from the step's."""
    from multiverse.engine.model.attention.native import (
        DecodeIndex,
        LayerAttention,
        decode_attention,
    )

    gen = torch.Generator().manual_seed(3)
    hk, g, d, layers = 3, 3, 64, 4
    pools = torch.randn(layers, 300, 2, hk, d, generator=gen)
    kv = [torch.randperm(300, generator=gen)[:n] for n in (5, 40, 130)]
    index = DecodeIndex.per_sequence(kv)
    width = (hk * g + 2 * hk) * d
    bound = LayerAttention(kernel, index, pools[0], hk * g * d, width)
    for layer in range(layers):
        qkv = torch.randn(3, width, generator=gen)
        want = decode_attention(kernel, qkv[:, : hk * g * d], pools[layer], index)
        assert torch.equal(bound(qkv, pools[layer]), want)
    with pytest.raises(ValueError, match="differs from the step's"):
        bound(torch.randn(2, width), pools[0])
    with pytest.raises(ValueError, match="differs from the step's"):
        bound(torch.randn(3, width), pools[0, :200])
    with pytest.raises(ValueError, match="slots outside"):
        LayerAttention(kernel, DecodeIndex.per_sequence([torch.tensor([400])]), pools[0], 576, 960)


def finite_2x32(out: torch.Tensor) -> bool:
    return out.shape == (2, 32) and bool(torch.isfinite(out).all())


def test_build_reports_the_compiler_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels.build(cc="false", directory=tmp_path, isa="avx2")
    with pytest.raises(RuntimeError, match="no C compiler"):
        cpu_kernels.build(cc="no-such-compiler-xyz", directory=tmp_path, isa="avx2")


@avx512
def test_failed_build_warns_once_and_the_torch_kernels_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setenv("MULTIVERSE_KERNEL_CACHE", str(tmp_path))
    cpu_kernels.reset()
    try:
        with pytest.warns(RuntimeWarning, match="CPU kernels unavailable.*no C compiler"):
            assert cpu_kernels.load() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second load (each QuantLinear) stays quiet
            q = QuantLinear("int8", torch.randn(96, 192) * 0.05)
            x = torch.randn(2, 192)
            assert torch.equal(q(x), q.nibble_forward(x.bfloat16()).float())
    finally:
        cpu_kernels.reset()  # later tests load the real kernel again


@avx512
def test_model_decode_with_the_attention_kernel_matches_the_reference_backend() -> None:
    """The tiny model (GQA, head_dim 24: a masked tail in the kernel), 4 ragged sequences, 6
    greedy decode steps: the default CPU path (the pool-reading kernel) and the reference
    backend pick the same tokens, log-probabilities within 1e-4."""
    from pathlib import Path

    from multiverse.engine.loader import load_model
    from multiverse.engine.model import ForwardBatch, KVPool
    from multiverse.engine.model.attention import build_attention_plan

    model, _, _ = load_model(Path(__file__).resolve().parents[2] / "models" / "multiverse-tiny")
    gen = torch.Generator().manual_seed(0)
    lens = [3, 11, 6, 1]
    slots = torch.randperm(96, generator=gen)
    owned = [slots[24 * i : 24 * i + 24] for i in range(len(lens))]
    ids = [torch.randint(0, model.vocab_size, (n,), generator=gen) for n in lens]
    pools = {True: KVPool.for_model(model, 96), False: KVPool.for_model(model, 96)}
    with torch.inference_mode():
        prefill = ForwardBatch(torch.cat(ids), torch.cat([torch.arange(n) for n in lens]),
                               torch.cat([o[:n] for o, n in zip(owned, lens)]), lens,
                               [o[:n] for o, n in zip(owned, lens)], [None] * len(lens))  # fmt: skip
        nxt = {r: model(prefill, pools[r], reference=r).argmax(-1) for r in (True, False)}
        assert torch.equal(nxt[True], nxt[False])
        for step in range(6):
            pos = torch.tensor([n + step for n in lens])
            batch = ForwardBatch(nxt[True], pos, torch.stack([o[p] for o, p in zip(owned, pos)]),
                                 [1] * len(lens), [o[: p + 1] for o, p in zip(owned, pos)],
                                 [None] * len(lens))  # fmt: skip
            assert build_attention_plan(batch).native is not None  # the kernel's path
            logp = {r: model(batch, pools[r], reference=r).log_softmax(-1) for r in (True, False)}
            torch.testing.assert_close(logp[False], logp[True], atol=1e-4, rtol=0)
            nxt = {r: logp[r].argmax(-1) for r in (True, False)}
            assert torch.equal(nxt[True], nxt[False])
