"""The layout rule (SPEC 3): hand-computed cases, property tests, flex == dense, HF isolation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multiverse.format.grammar import TAGS
from multiverse.format.layout import LayoutState, layout, layout_tags, pack, positions_and_mask

T = None  # an ordinary token
NL = None  # "\n" is an ordinary token too


def block(paths: list[int], outline_len: int = 1, concl: int = 1) -> list:
    """Tags of one canonical block whose path i has ``paths[i]`` text tokens."""
    out = ["<Parallel>", "<Goal>"]
    for _ in paths:
        out += ["<Outline>"] + [T] * outline_len + ["</Outline>"]
    out += ["</Goal>", NL]
    for n in paths:
        out += ["<Path>"] + [T] * n + ["</Path>", NL]
    out += ["<Conclusion>"] + [T] * concl + ["</Conclusion>", "</Parallel>"]
    return out


WORKED = [T, "<Parallel>", "<Goal>", "<Outline>", T, "</Outline>", "<Outline>", T, "</Outline>",
          "</Goal>", NL, "<Path>", T, T, "</Path>", NL, "<Path>", T, "</Path>", NL,
          "<Conclusion>", T, "</Conclusion>", "</Parallel>", T]  # fmt: skip


def test_spec_worked_example():
    lay = layout_tags(WORKED)
    assert lay.position_ids.tolist() == list(range(16)) + [11, 12, 13, 14] + [16, 17, 18, 19, 20]
    m = lay.dense_mask()
    assert not m[16:20, 11:16].any()  # path 2 never sees path 1
    assert m[16:20, :11].all()  # ... but sees the whole prefix incl. Goal and the "\n"
    assert m[11:16, :11].all() and not m[11:16, 16:].any()
    assert m[20:, :].sum() == sum(range(21, 26))  # everything after sees all before it
    assert lay.depth_tokens(1) == 20 and lay.parallel_degree(1) == pytest.approx(1.2)


def test_uneven_paths_and_several_blocks_and_text_after():
    tags = [T, T] + block([3, 1, 5]) + [T, T] + block([2, 2]) + [T]
    pos = layout_tags(tags).position_ids.tolist()
    # block 1: prefix 2 tokens, <Parallel> at 2, goal: <Goal>, 3x(<Outline> t </Outline>), </Goal>, \n
    s = 2 + 1 + 1 + 9 + 1 + 1  # = 15, position of every <Path>
    p1 = list(range(s, s + 6))  # <Path> t t t </Path> \n
    p2 = list(range(s, s + 4))
    p3 = list(range(s, s + 8))
    concl = s + 8  # 1 + max path end (path 3 ends at s+7)
    b1 = list(range(2)) + list(range(2, s)) + p1 + p2 + p3 + [concl, concl + 1, concl + 2, concl + 3]
    after = concl + 4
    s2 = after + 2 + 1 + 1 + 6 + 1 + 1
    b2 = [after, after + 1] + list(range(after + 2, s2)) + list(range(s2, s2 + 5)) * 2
    c2 = s2 + 5
    expected = b1 + b2 + [c2, c2 + 1, c2 + 2, c2 + 3, c2 + 4]
    assert pos == expected


def test_nesting_depth_3_by_hand():
    inner = block([1, 2])  # depth 3
    mid = ["<Parallel>", "<Goal>", "<Outline>", T, "</Outline>", "<Outline>", T, "</Outline>", "</Goal>", NL,
           "<Path>", T] + inner + [NL, "</Path>", NL, "<Path>", T, "</Path>", NL,
           "<Conclusion>", T, "</Conclusion>", "</Parallel>"]  # fmt: skip
    outer = ["<Parallel>", "<Goal>", "<Outline>", T, "</Outline>", "<Outline>", T, "</Outline>", "</Goal>", NL,
             "<Path>", T] + mid + [NL, "</Path>", NL, "<Path>", T, T, "</Path>", NL,
             "<Conclusion>", T, "</Conclusion>", "</Parallel>", T]  # fmt: skip
    lay = layout_tags([T] + outer)
    assert lay.num_levels == 3
    pos = lay.position_ids.tolist()
    # outer paths start at 11; the second outer path (4 tokens) starts at 11 too
    first_paths = [i for i, t in enumerate([T] + outer) if t == "<Path>"]
    # q0 | outer: <Parallel>1 <Goal>2 outlines 3-8 </Goal>9 \n10 <Path>11 t12
    # mid: <Parallel>13 <Goal>14 outlines 15-20 </Goal>21 \n22 <Path>23 t24
    # inner: <Parallel>25 <Goal>26 outlines 27-32 </Goal>33 \n34, paths at 35: 35-38 and 35-39,
    #   <Conclusion>40 t41 </Conclusion>42 </Parallel>43; mid path 1: \n44 </Path>45 \n46
    # mid path 2 at 23: 23-26; mid <Conclusion>47 ... </Parallel>50; outer path 1: \n51 </Path>52 \n53
    # outer path 2 at 11: 11-15; outer <Conclusion>54 t55 </Conclusion>56 </Parallel>57; t58
    assert [pos[i] for i in first_paths] == [11, 23, 35, 35, 23, 11]
    concl = [i for i, t in enumerate([T] + outer) if t == "<Conclusion>"]
    assert [pos[i] for i in concl] == [40, 47, 54]
    assert pos[-1] == 58
    m = lay.dense_mask()
    ip = [i for i in first_paths][2:4]
    assert not m[ip[1], ip[0]]  # inner siblings isolated
    assert m[-1].all()


def test_truncated_prefix_is_prefix_of_full():
    full = [T] + block([3, 2, 4]) + [T]
    whole = layout_tags(full)
    for cut in range(1, len(full)):
        part = layout_tags(full[:cut])
        assert part.position_ids.tolist() == whole.position_ids[:cut].tolist()
        assert torch.equal(part.dense_mask(), whole.dense_mask()[:cut, :cut])


def test_misplaced_tags_are_ordinary():
    # <Conclusion> before any path and <Path> after the Conclusion: plain positions
    tags = [T, "<Parallel>", "<Goal>", "</Goal>", "<Conclusion>", T, "</Conclusion>", "<Path>", T, "</Parallel>", "<Path>"]
    lay = layout_tags(tags)
    assert lay.position_ids.tolist() == list(range(len(tags)))
    assert lay.dense_mask().equal(torch.tril(torch.ones(len(tags), len(tags), dtype=torch.bool)))


def test_positions_and_mask_on_token_ids():
    tag_ids = {t: 100 + i for i, t in enumerate(TAGS)}
    ids = [7 if t is None else tag_ids[t] for t in WORKED]
    pos, mask = positions_and_mask(ids, tag_ids)
    assert pos.dtype == torch.long and mask.dtype == torch.bool and mask.shape == (25, 25)
    assert pos.tolist() == layout_tags(WORKED).position_ids.tolist()
    assert positions_and_mask(torch.tensor(ids), tag_ids)[1].equal(mask)
    with pytest.raises(ValueError, match="missing"):
        positions_and_mask(ids, {"<Path>": 1})


def test_fork_join_matches_full_sequence():
    tags = [T] + block([3, 1, 4]) + [T]
    full = layout_tags(tags).position_ids.tolist()
    st_ = LayoutState()
    got = [st_.step(t) for t in tags[: tags.index("</Goal>") + 2]]
    children = st_.fork(3)
    for child, n in zip(children, [3, 1, 4]):
        got += [child.step(t) for t in ["<Path>"] + [T] * n + ["</Path>", NL]]
    parent = st_.join(children)
    got += [parent.step(t) for t in ["<Conclusion>", T, "</Conclusion>", "</Parallel>", T]]
    assert got == full
    with pytest.raises(ValueError):
        parent.fork(2)  # not in phase goal


def test_pack_isolates_documents():
    a, b = layout_tags(WORKED), layout_tags([T] + block([2, 2]))
    p = pack([a, b])
    assert p.position_ids.tolist() == a.position_ids.tolist() + b.position_ids.tolist()
    m = p.dense_mask()
    n = len(a)
    assert not m[n:, :n].any()
    assert m[:n, :n].equal(a.dense_mask()) and m[n:, n:].equal(b.dense_mask())


# ------------------------------------------------------------------ property tests


@st.composite
def trees(draw, depth: int = 1):
    """A random well-formed body: list of ("text", n) and ("block", outline_lens, paths, concl)."""
    items = []
    for _ in range(draw(st.integers(0 if depth > 1 else 1, 3))):
        if depth <= 3 and draw(st.booleans()):
            k = draw(st.integers(1, 4))
            paths = [draw(trees(depth + 1)) for _ in range(k)]
            items.append(("block", [draw(st.integers(0, 2)) for _ in range(k)], paths, draw(st.integers(0, 2))))
        else:
            items.append(("text", draw(st.integers(1, 3))))
    return items


def render(items, out, info, pos, owner):
    """Tags + an independent recursive oracle of positions (pos = next position) and owners."""
    for it in items:
        if it[0] == "text":
            for _ in range(it[1]):
                out.append(T), info.append((pos, owner))
                pos += 1
            continue
        _, outlines, paths, concl = it
        seq = ["<Parallel>", "<Goal>"]
        for n in outlines:
            seq += ["<Outline>"] + [T] * n + ["</Outline>"]
        seq += ["</Goal>", NL]
        for t in seq:
            out.append(t), info.append((pos, owner))
            pos += 1
        start, ends, bid = pos, [], object()
        path_starts = []
        for i, body in enumerate(paths):
            path_owner = owner + ((bid, i),)
            path_starts.append(len(out))
            out.append("<Path>"), info.append((start, path_owner))
            p = render(body, out, info, start + 1, path_owner)
            for t in ["</Path>", NL]:
                out.append(t), info.append((p, path_owner))
                p += 1
            ends.append(p - 1)
        pos = max(ends) + 1
        info_block = ("block", path_starts, pos, len(out))
        for t in ["<Conclusion>"] + [T] * concl + ["</Conclusion>", "</Parallel>"]:
            out.append(t), info.append((pos, owner))
            pos += 1
        BLOCKS.append(info_block)
    return pos


BLOCKS: list = []


def oracle_mask(info):
    """Token q sees token k <= q iff both took the same path of every block they are both in."""
    n = len(info)
    owners = [dict(owner) for _, owner in info]  # block -> the path taken in it
    rows = [
        [all(oq[b] == ok[b] for b in oq.keys() & ok.keys()) for ok in owners[: q + 1]]
        + [False] * (n - q - 1)
        for q, oq in enumerate(owners)
    ]
    return torch.tensor(rows, dtype=torch.bool).reshape(n, n)


@settings(max_examples=60, deadline=None)
@given(trees())
def test_property_random_trees(items):
    BLOCKS.clear()
    out, info = [], []
    render(items, out, info, 0, ())
    lay = layout_tags(out)
    pos = lay.position_ids.tolist()
    assert pos == [p for p, _ in info]  # positions == the recursive oracle
    m = lay.dense_mask()
    assert torch.equal(m, oracle_mask(info))  # siblings never see each other, nesting composes
    assert not torch.triu(m, 1).any() and m.diagonal().all()  # causal
    for _, path_starts, concl_pos, concl_idx in BLOCKS:
        assert len({pos[i] for i in path_starts}) == 1  # siblings start at the same position
        assert pos[concl_idx] == concl_pos == 1 + max(pos[path_starts[0]:concl_idx])


@settings(max_examples=15, deadline=None)
@given(trees(), st.sampled_from([4, 8, 16]))
def test_property_flex_mask_equals_dense(items, block_size):
    from torch.nn.attention.flex_attention import flex_attention

    out, info = [], []
    render(items, out, info, 0, ())
    lay = layout_tags(out)
    n = len(lay)
    dense = lay.dense_mask()
    bm = lay.block_mask(block_size=block_size)
    # tile-level: a tile is listed (partial or full) iff some pair in it is allowed
    nb = -(-n // block_size)
    pad = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
    pad[:n, :n] = dense
    tiles = pad.view(nb, block_size, nb, block_size).any(3).any(1)
    assert torch.equal(bm.to_dense()[0, 0].bool(), tiles)
    # the two tile classifiers (membership runs / row by row) agree exactly
    seg_partial, seg_full = lay._tiles_from_segments(lay.segments(), block_size)
    row_partial, row_full = lay._tiles_by_rows(block_size)
    assert torch.equal(seg_full, row_full)
    assert torch.equal(seg_partial | seg_full, row_partial | row_full)
    # element-level: flex_attention with the BlockMask == SDPA with the dense mask
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = flex_attention(q, k, v, block_mask=bm)
    assert torch.allclose(got, ref, atol=1e-5)


# ------------------------------------------------------------------ against Hugging Face


def test_isolation_against_hf_qwen2():
    """Path 2's logits in the full Multiverse sequence == logits of prefix + path 2 alone."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    tag_ids = {t: 100 + i for i, t in enumerate(TAGS)}
    g = torch.Generator().manual_seed(1)

    def words(n):
        return torch.randint(0, 90, (n,), generator=g).tolist()

    nl = [95]
    prefix = words(3) + [tag_ids["<Parallel>"], tag_ids["<Goal>"]]
    for _ in range(2):
        prefix += [tag_ids["<Outline>"]] + words(2) + [tag_ids["</Outline>"]]
    prefix += [tag_ids["</Goal>"]] + nl
    path1 = [tag_ids["<Path>"]] + words(6) + [tag_ids["</Path>"]] + nl
    path2 = [tag_ids["<Path>"]] + words(3) + [tag_ids["</Path>"]] + nl
    tail = [tag_ids["<Conclusion>"]] + words(2) + [tag_ids["</Conclusion>"], tag_ids["</Parallel>"]]
    ids = prefix + path1 + path2 + tail
    lay = layout(ids, tag_ids)
    with torch.no_grad():
        full = model(
            input_ids=torch.tensor([ids]),
            position_ids=lay.position_ids[None],
            attention_mask=lay.hf_attention_mask(torch.float32),
        ).logits[0]
        alone_ids = prefix + path2
        alone = model(
            input_ids=torch.tensor([alone_ids]),
            position_ids=torch.arange(len(alone_ids))[None],
        ).logits[0]
    a, b = len(prefix) + len(path1), len(prefix) + len(path1) + len(path2)
    assert lay.position_ids[a:b].tolist() == list(range(len(prefix), len(alone_ids)))
    assert torch.allclose(full[a:b], alone[len(prefix):], atol=1e-5)
    assert torch.allclose(full[: len(prefix)], alone[: len(prefix)], atol=1e-5)
    # and the mask really matters: with plain causal attention path 2 would differ
    with torch.no_grad():
        causal = model(input_ids=torch.tensor([ids]), position_ids=lay.position_ids[None]).logits[0]
    assert not torch.allclose(causal[a:b], alone[len(prefix):], atol=1e-3)
