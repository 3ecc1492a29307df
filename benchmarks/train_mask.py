"""Training mask memory: one 32K-token Multiverse example with 100 Parallel blocks, through the
trainer's own path (render -> tokenize -> MultiverseCollator -> attention_mask_for("flex")),
bytes of what training holds for the mask (the flex BlockMask + the layout's per-token id
tensors) vs the dense float ``[L, L]`` mask the authors' trainer built per example
(4 GiB at 32K in fp32). Goal: <= 1/100.

The BlockMask is checked against the layout's dense rows on sampled query tiles (every tile it
skips is fully masked, every tile it marks full is fully visible).

    python benchmarks/train_mask.py [--tokens 32768] [--blocks 100] [--block-size 128]

Prints a few lines and a JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from multiverse.format import grammar
from multiverse.train import data as D
from multiverse.train.bpe import default_tokenizer
from multiverse.train.collate import MultiverseCollator
from multiverse.train.masks import attention_mask_for

WORDS = "we add the values then compare each total and keep the largest one so far".split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def chain(n_blocks: int, words_per_path: int, seed: int = 0) -> str:
    """Valid Multiverse text: ``n_blocks`` blocks of 2-5 paths between sequential steps."""
    rng = random.Random(seed)
    out = ["<Think>\n"]
    for b in range(n_blocks):
        k = rng.randint(2, 5)
        out.append(sentence(rng, words_per_path // 2) + f"\n{grammar.CUE}\n<Parallel>\n<Goal>\n")
        out += [f"<Outline>\n{i + 1}: part {i + 1} of step {b + 1}\n</Outline>\n" for i in range(k)]
        out.append("</Goal>\n")
        out += [
            f"<Path>\n{i + 1}: {sentence(rng, rng.randint(words_per_path // 2, words_per_path))}\n</Path>\n"
            for i in range(k)
        ]
        out.append(f"<Conclusion>\n{sentence(rng, 8)}\n</Conclusion>\n</Parallel>\n")
    out.append("So the answer follows.\n</Think>")
    return "".join(out)


def nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def block_mask_bytes(bm) -> int:
    names = (
        "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
        "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
    )  # fmt: skip
    return sum(nbytes(getattr(bm, n, None)) for n in names)


def check_tiles(bm, layout, block_size: int, samples: int, seed: int = 0) -> int:
    """Compare the BlockMask's tile classes with dense rows of sampled query tiles."""
    n = len(layout)
    nb = -(-n // block_size)
    kv_num, kv_idx = bm.kv_num_blocks[0, 0], bm.kv_indices[0, 0]
    full_num, full_idx = bm.full_kv_num_blocks[0, 0], bm.full_kv_indices[0, 0]
    rng = random.Random(seed)
    for qb in sorted(rng.sample(range(nb), min(samples, nb))):
        rows = layout.dense_mask(slice(qb * block_size, min(n, (qb + 1) * block_size)))
        pad = nb * block_size - n
        rows = torch.nn.functional.pad(rows, (0, pad))
        tiles = rows.view(rows.shape[0], nb, block_size)
        anyv, allv = tiles.any(2).any(0), tiles.all(2).all(0)
        partial = set(kv_idx[qb, : kv_num[qb]].tolist())
        full = set(full_idx[qb, : full_num[qb]].tolist())
        for kb in range(nb):
            if kb in full:
                assert allv[kb], f"tile {qb},{kb} marked full but has masked keys"
            elif kb not in partial:
                assert not anyv[kb], f"tile {qb},{kb} skipped but has visible keys"
    return min(samples, nb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--blocks", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--check-tiles", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady timings on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = default_tokenizer()
    tags = grammar.tag_ids(tok)
    words = 20
    while True:  # grow the paths until the example reaches the token target
        record = D.Record("bench", "Find the answer.", chain(args.blocks, words), "42")
        ids, labels = D.tokenize(tok, D.render(record, "multiverse"))
        if len(ids) >= args.tokens:
            break
        words = max(words + 1, int(words * args.tokens / len(ids)))
    assert grammar.validate(record.chain) == [], "synthetic chain must be valid Multiverse text"
    ids, labels = ids[: args.tokens], labels[: args.tokens]  # a prefix: the rule still applies
    example = D.Example(ids, labels, "multiverse", "bench")

    t0 = time.perf_counter()
    batch = MultiverseCollator(tags, tok.pad_token_id, pad_to_multiple_of=args.block_size)(
        [example]
    )
    t1 = time.perf_counter()
    bm = attention_mask_for(batch["layouts"], "flex", "cpu", block_size=args.block_size)
    t2 = time.perf_counter()
    layout = batch["layouts"][0]
    n = len(layout)
    id_bytes = sum(
        nbytes(t) for t in (layout.position_ids, layout.block_ids, layout.path_ids, layout.doc_ids)
    )
    bm_bytes = block_mask_bytes(bm)
    dense_bytes = n * n * 4
    checked = check_tiles(bm, layout, args.block_size, args.check_tiles)
    nb = -(-n // args.block_size)
    visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    result = {
        "threads": torch.get_num_threads(),
        "tokens": n,
        "blocks": args.blocks,
        "nesting_levels": layout.num_levels,
        "block_size": args.block_size,
        "blockmask_bytes": bm_bytes,
        "id_tensor_bytes": id_bytes,
        "training_mask_bytes": bm_bytes + id_bytes,
        "dense_float_mask_bytes": dense_bytes,
        "ratio": (bm_bytes + id_bytes) / dense_bytes,
        "goal_ratio": 0.01,
        "tiles_visited_fraction": visited / (nb * (nb + 1) / 2),
        "collate_s": round(t1 - t0, 3),
        "blockmask_build_s": round(t2 - t1, 3),
        "tiles_checked": checked,
    }
    print(
        f"example: {n} tokens, {args.blocks} blocks, parallel degree {layout.parallel_degree():.2f}"
    )
    print(f"training mask: BlockMask {bm_bytes / 2**20:.2f} MiB + ids {id_bytes / 2**20:.2f} MiB")
    print(
        f"dense float mask: {dense_bytes / 2**30:.2f} GiB -> ratio 1/{dense_bytes / (bm_bytes + id_bytes):.0f}"
    )
    print(
        f"collate {result['collate_s']} s, BlockMask {result['blockmask_build_s']} s; {checked} query tiles checked"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
