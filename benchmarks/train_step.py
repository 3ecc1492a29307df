"""Training step time: Multiverse attention vs plain causal attention on the same tokens.

One packed row of synthetic Multiverse task examples (``multiverse.eval.tasks``), a preset Qwen2
model, AdamW. A step = mask construction from the batch's layouts + forward + backward +
optimizer step (:func:`multiverse.train.trainer.multiverse_forward_loss`, the Trainer's own
loss). The causal baseline runs the same tokens and targets with positions ``0..n-1`` and no
mask (the model's ``is_causal`` path). Steps of the two alternate; medians are reported. Backend: flex_attention (BlockMask) on CUDA, SDPA with a
boolean mask on CPU. Goal: Multiverse / causal <= 1.3.

    python benchmarks/train_step.py [--tokens 2048] [--preset qwen2-tiny] [--steps 5] [--device auto]

Prints a few lines and a JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from multiverse.eval import tasks
from multiverse.format import grammar
from multiverse.format import layout as attention
from multiverse.train import data as D
from multiverse.train.bpe import default_tokenizer
from multiverse.train.collate import MultiverseCollator
from multiverse.train.masks import ATTN_IMPLEMENTATION, resolve_backend
from multiverse.train.presets import build_model
from multiverse.train.trainer import multiverse_forward_loss


def packed_batch(tok, tokens: int, block: int) -> dict:
    """One row of whole task examples, about ``tokens`` long (padded to ``block``)."""
    tags = grammar.tag_ids(tok)
    examples, total = [], 0
    for r in tasks.iter_records(seed=0):
        rec = D.Record("b", r.question, r.chain, str(r.answer))
        ids, labels = D.tokenize(tok, D.render(rec, "multiverse"))
        if total + len(ids) > tokens:
            break
        examples.append(D.Example(ids, labels, "multiverse", "b"))
        total += len(ids)
    return MultiverseCollator(tags, tok.pad_token_id, pad_to_multiple_of=block)(examples)


def causal_version(batch: dict) -> dict:
    """The same tokens and targets under plain causal attention (one document, 0..n-1)."""
    n = batch["input_ids"].shape[1]
    plain = attention.Layout(
        torch.arange(n),
        torch.empty(0, n, dtype=torch.long),
        torch.empty(0, n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
    )
    return dict(batch, position_ids=plain.position_ids[None], layouts=(plain,))


class Runner:
    """One model + optimizer + batch; ``step()`` returns the wall time of one training step."""

    def __init__(self, model, batch, backend, device):
        self.model, self.backend, self.device = model, backend, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.batch = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }

    def step(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = multiverse_forward_loss(self.model, self.batch, self.backend)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--preset", default="qwen2-tiny")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--attention", default="auto", help="auto | flex | sdpa | eager")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady timings on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    backend = resolve_backend(args.attention, device)
    tok = default_tokenizer()
    block = 128
    batch = packed_batch(tok, args.tokens, block)
    layout = batch["layouts"][0]
    runners = {
        name: Runner(
            build_model(args.preset, tok, ATTN_IMPLEMENTATION[backend], seed=0).to(device).train(),
            b,
            backend,
            device,
        )
        for name, b in (("multiverse", batch), ("causal", causal_version(batch)))
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):  # interleaved, so load drifts hit both alike
        for name, runner in runners.items():
            t = runner.step()
            if i >= args.warmup:
                times[name].append(t)
    results = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in results.items():
        print(f"{name:>10}: median step {t * 1e3:.1f} ms over {args.steps} steps")
    ratio = results["multiverse"] / results["causal"]
    n = batch["input_ids"].shape[1]
    print(
        f"{n} tokens, {int(layout.doc_ids.max()) + 1} documents, {args.preset}, {backend} on {device}: ratio {ratio:.2f}"
    )
    print(
        json.dumps(
            {
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else "cpu",
                "attention": backend,
                "preset": args.preset,
                "tokens": n,
                "documents": int(layout.doc_ids.max()) + 1,
                "multiverse_step_s": round(results["multiverse"], 5),
                "causal_step_s": round(results["causal"], 5),
                "ratio": round(ratio, 3),
                "goal_ratio": 1.3,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
