"""Every attention backend against the reference backend, on random pools and queries.

These tests sit below the model: random q / K / V (GQA and MHA, several head sizes), batches of
every shape the engine produces (fresh prefill, prefill chunks over cached prefixes, custom
masks, same-length and ragged decode, shared-prefix decode groups), and the contract of
:class:`multiverse.engine.model.AttentionMetadata`: ``attend(q, new_kv, pool)`` equals the
reference attention of each sequence over ``pool[kv_indices[i]]`` with its mask.
"""

from __future__ import annotations

import pytest
import torch

from multiverse.engine.model import (
    ATTENTION_BACKENDS,
    ForwardBatch,
    build_attention_plan,
    build_cascade_plan,
    build_reference_plan,
    causal_mask,
    reference_attention,
)

ATOL = 1e-5
NUM_SLOTS = 160
HEADS = [(4, 4, 8), (4, 2, 16), (6, 1, 8), (9, 3, 64)]  # (query heads, kv heads, head_dim)
HEAD_IDS = ["mha", "gqa2", "mqa", "gqa3_d64"]

# Each case: (q_len, kv_len, custom mask) per sequence, and the shared-prefix groups as
# (prefix length, member sequence indices); members' kv_indices start with their group's prefix.
CASES: dict[str, tuple[list[tuple[int, int, bool]], list[tuple[int, list[int]]] | None]] = {
    "fresh_prefill": ([(9, 9, False)], None),
    "prefill_chunks": ([(5, 5, False), (4, 11, False), (2, 3, False)], None),
    "custom_masks": ([(3, 8, True), (4, 11, False), (1, 6, True), (5, 5, True)], None),
    "decode_same_len": ([(1, 7, False)] * 3, None),
    "decode_ragged": ([(1, 3, False), (1, 12, False), (1, 5, False), (1, 1, False)], None),
    "decode_groups": (
        [(1, 12, False), (1, 5, False), (1, 10, False), (1, 6, False), (1, 14, False)],
        [(9, [0, 2, 4]), (4, [1]), (5, [3])],
    ),
}
DECODE_CASES = [name for name, (seqs, _) in CASES.items() if all(q == 1 for q, _, _ in seqs)]
GROUP_CASES = [name for name, (_, groups) in CASES.items() if groups is not None]


def _make(
    case: str, heads: tuple[int, int, int], seed: int
) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, q [T, Hq*D], new_kv [T, 2, Hk, D], pool [S, 2, Hk, D]) for one case, with the new
    K/V already written to the pool, as ``CausalLM.step`` does before attention."""
    hq, hk, d = heads
    seqs, groups = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(NUM_SLOTS, generator=gen)
    taken = 0

    def take(n: int) -> torch.Tensor:
        nonlocal taken
        taken += n
        return free[taken - n : taken]

    prefix_of: dict[int, torch.Tensor] = {}
    group_list = []
    for length, members in groups or []:
        prefix = take(length)
        group_list.append((prefix, members))
        prefix_of.update(dict.fromkeys(members, prefix))
    kv_indices, masks, q_lens = [], [], []
    for i, (q_len, kv_len, custom) in enumerate(seqs):
        prefix = prefix_of.get(i, torch.empty(0, dtype=torch.long))
        kv_indices.append(torch.cat([prefix, take(kv_len - prefix.shape[0])]))
        q_lens.append(q_len)
        if custom:
            m = torch.rand(q_len, kv_len, generator=gen) < 0.5
            m[:, 0] = True  # every query sees at least one key
            masks.append(m)
        else:
            masks.append(None)
    t = sum(q_lens)
    slot_mapping = torch.cat([ix[ix.shape[0] - q :] for q, ix in zip(q_lens, kv_indices)])
    pool = torch.randn(NUM_SLOTS, 2, hk, d, generator=gen)  # [S, 2, Hk, D]
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen)  # [T, (Hq + 2 Hk) * D]
    q = qkv[:, : hq * d]  # [T, Hq * D], a non-contiguous view like the model's
    new_kv = qkv[:, hq * d :].view(t, 2, hk, d)  # [T, 2, Hk, D]
    pool.index_copy_(0, slot_mapping, new_kv)
    batch = ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.long),
        position_ids=torch.zeros(t, dtype=torch.long),
        slot_mapping=slot_mapping,
        q_lens=q_lens,
        kv_indices=kv_indices,
        masks=masks,
        groups=group_list or None,
    )
    return batch, q, new_kv, pool


def _reference(batch: ForwardBatch, q: torch.Tensor, new_kv, pool) -> torch.Tensor:
    return build_reference_plan(batch).attend(q, new_kv, pool)


def _without_groups(batch: ForwardBatch) -> ForwardBatch:
    return ForwardBatch(
        batch.input_ids,
        batch.position_ids,
        batch.slot_mapping,
        batch.q_lens,
        batch.kv_indices,
        batch.masks,
    )


def test_registry_names_every_backend():
    assert set(ATTENTION_BACKENDS) == {"reference", "sdpa", "cascade"}
    assert ATTENTION_BACKENDS["reference"] is build_reference_plan
    assert ATTENTION_BACKENDS["sdpa"] is build_attention_plan
    assert ATTENTION_BACKENDS["cascade"] is build_cascade_plan


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_backend_equals_reference(case, heads):
    """The torch path (``native=False``: gather + SDPA, cascade for groups)."""
    batch, q, new_kv, pool = _make(case, heads, seed=len(case))
    ref = _reference(batch, q, new_kv, pool)
    plan = build_attention_plan(batch, fold_gqa=False, native=False)
    assert plan.fresh_causal == (case == "fresh_prefill")
    assert (plan.cascade is not None) == (case in GROUP_CASES) and plan.native is None
    out = plan.attend(q, new_kv, pool)
    assert out.shape == (q.shape[0], q.shape[1]) and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if batch.groups is not None:  # the same step without groups: the gathered path
        plain = build_attention_plan(_without_groups(batch), fold_gqa=False, native=False)
        assert plain.cascade is None
        torch.testing.assert_close(plain.attend(q, new_kv, pool), ref, atol=ATOL, rtol=0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: the compiled decode kernel is the CPU default only there
    (with more threads torch's SDPA runs; attention/sdpa.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_native_decode_kernel_equals_reference(case, heads, one_thread):
    """A CPU decode step on the one-pass kernel that reads K/V in the pool (``native``, the
    default where it is built), with and without shared-prefix groups (a group's prefix one
    segment for all its members), equals the reference within float32 rounding."""
    from multiverse.engine.model import cpu_kernels
    from multiverse.engine.model.attention import native as native_kernel

    fn = cpu_kernels.load()
    if fn is None:
        pytest.skip("the kernel is not built on this machine (no AVX-512 or no compiler)")
    batch, q, new_kv, pool = _make(case, heads, seed=200 + len(case))
    ref = _reference(batch, q, new_kv, pool)
    for b in (batch, _without_groups(batch)):
        plan = build_attention_plan(b, fold_gqa=False)
        assert plan.native is not None and plan.cascade is None and plan.gather is None
        segments = plan.native.segments.shape[0]
        grouped = b.groups is not None
        assert segments == (len(b.q_lens) + len(b.groups) if grouped else len(b.q_lens))
        out = plan.attend(q, new_kv, pool)
        assert plan.torch_plan is None  # the kernel ran, no gathered copy was made
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        assert torch.equal(out, native_kernel.decode_attention(fn, q, pool, plan.native))


@pytest.mark.parametrize("case", ["decode_ragged", "decode_groups"])
def test_native_plan_runs_the_torch_path_where_the_kernel_cannot(case):
    """bfloat16 pools and several torch threads: the same plan attends by gather + SDPA (or
    cascade), built once for the step, equal to the reference."""
    batch, q, new_kv, pool = _make(case, HEADS[1], seed=7)
    ref = _reference(batch, q, new_kv, pool)
    plan = build_attention_plan(batch, native=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = plan.attend(q, new_kv, pool)
    finally:
        torch.set_num_threads(threads)
    assert plan.torch_plan is not None
    assert (plan.torch_plan.cascade is not None) == (case == "decode_groups")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    half = build_attention_plan(batch, native=True)
    out16 = half.attend(q.bfloat16(), new_kv.bfloat16(), pool.bfloat16())
    assert half.torch_plan is not None and out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("case", [c for c in DECODE_CASES if c not in GROUP_CASES])
def test_sdpa_folded_gqa_decode_equals_reference(case, heads):
    """The CUDA decode layout (G query heads of a KV head as G query rows), run on CPU."""
    batch, q, new_kv, pool = _make(case, heads, seed=100 + len(case))
    plan = build_attention_plan(batch, fold_gqa=True, native=False)
    assert plan.fold_gqa
    out = plan.attend(q, new_kv, pool)
    torch.testing.assert_close(out, _reference(batch, q, new_kv, pool), atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("case", GROUP_CASES)
def test_cascade_backend_equals_reference(case, heads):
    batch, q, new_kv, pool = _make(case, heads, seed=200 + len(case))
    plan = ATTENTION_BACKENDS["cascade"](batch)
    out = plan.attend(q, new_kv, pool)
    assert out.shape == (q.shape[0], q.shape[1]) and out.dtype == q.dtype
    torch.testing.assert_close(out, _reference(batch, q, new_kv, pool), atol=ATOL, rtol=0)


def test_cascade_backend_needs_groups():
    batch, _, _, _ = _make("decode_ragged", HEADS[1], seed=3)
    with pytest.raises(ValueError, match="needs ForwardBatch.groups"):
        build_cascade_plan(batch)


@pytest.mark.parametrize("name", list(ATTENTION_BACKENDS))
def test_every_backend_validates_the_batch(name):
    batch, _, _, _ = _make("decode_groups", HEADS[1], seed=4)
    batch.groups = [(batch.kv_indices[0][:3], [0, 1, 2, 3, 4])]  # 1 and 3 lack the prefix
    with pytest.raises(ValueError, match="does not start with the group's prefix"):
        ATTENTION_BACKENDS[name](batch)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_reference_attention_is_softmax_per_head(heads):
    """The reference itself, against a per-head float64 loop (and its row chunking)."""
    hq, hk, d = heads
    gen = torch.Generator().manual_seed(5)
    n, m = 5, 9
    q = torch.randn(n, hq, d, generator=gen)
    k = torch.randn(m, hk, d, generator=gen)
    v = torch.randn(m, hk, d, generator=gen)
    mask = causal_mask(n, m) & (torch.rand(n, m, generator=gen) < 0.7)
    mask[:, 0] = True
    expected = torch.empty(n, hq, d, dtype=torch.float64)
    for h in range(hq):
        kv_head = h // (hq // hk)
        scores = q[:, h].double() @ k[:, kv_head].double().T / d**0.5  # [n, m]
        scores = scores.masked_fill(~mask, float("-inf"))
        expected[:, h] = torch.softmax(scores, dim=-1) @ v[:, kv_head].double()
    got = reference_attention(q, k, v, mask)
    torch.testing.assert_close(got.double(), expected.reshape(n, hq * d), atol=1e-5, rtol=0)
    chunked = reference_attention(q, k, v, mask, max_score_bytes=1)  # one query row at a time
    torch.testing.assert_close(chunked, got, atol=1e-6, rtol=0)
