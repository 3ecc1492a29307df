"""Write ``train_log_summary.json`` for a model directory made by ``multiverse train``.

Reads the trainer's ``train_summary.json`` and ``train_log.jsonl`` in DIR (and the weights, or
a LoRA adapter's own tensors, for the parameter count) and writes the figures a model README quotes: run time, steps, examples,
first/final loss and the loss every ``--every`` steps.

    python scripts/summarize_training.py models/multiverse-tiny --hardware "..." \\
        --reproduce "scripts/train_tiny.sh models cpu" [--wall-s 2600]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def summarize(model_dir: Path, hardware: str, reproduce: str, wall_s: float | None, every: int) -> dict:
    summary_path, log_path = model_dir / "train_summary.json", model_dir / "train_log.jsonl"
    for path in (summary_path, log_path):
        if not path.is_file():
            raise SystemExit(f"summarize_training: {path} is missing (not a multiverse train output?)")
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    final = next((r for r in reversed(rows) if "train_runtime" in r), {})
    if not losses:
        raise SystemExit(f"summarize_training: {log_path} has no loss entries")
    cfg = summary["config"]
    from safetensors import safe_open

    if (model_dir / "adapter_config.json").is_file():  # a LoRA adapter (multiverse train --lora)
        adapter = json.loads((model_dir / "adapter_config.json").read_text())
        lora = summary.get("lora", {})
        architecture = (
            f"LoRA adapter on {summary.get('base_model')}: r {adapter['r']}, alpha "
            f"{adapter['lora_alpha']}, targets {adapter['target_modules']}, plus the tag rows "
            f"{adapter.get('trainable_token_indices')}; {lora.get('trainable_parameters')} of "
            f"{lora.get('parameters')} parameters trainable"
        )
        weights = model_dir / "adapter_model.safetensors"
    else:
        config = json.loads((model_dir / "config.json").read_text())
        architecture = (
            f"{config['architectures'][0]}, preset {cfg['config']}: hidden {config['hidden_size']}, "
            f"{config['num_hidden_layers']} layers, {config['num_attention_heads']} heads "
            f"({config['num_key_value_heads']} KV), MLP {config['intermediate_size']}, "
            f"vocab {config['vocab_size']}, tied embeddings {config.get('tie_word_embeddings')}"
        )
        weights = model_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {
        "model": model_dir.name,
        "architecture": architecture,
        "parameters": params,  # of the weights file (an adapter: its own tensors)
        "dtype": "float32",
        "mode": cfg["mode"],
        "reproduce": reproduce,
        "hardware": hardware,
        "wall_s": wall_s,
        "train_runtime_s": final.get("train_runtime"),
        "global_step": summary["global_step"],
        "epochs": final.get("epoch"),
        "examples_seen": summary["global_step"] * cfg["batch_size"] * cfg["grad_accum"],
        "data": summary["data"],
        "config": cfg,
        "loss_first": round(losses[0][1], 5),
        "loss_final": round(losses[-1][1], 5),
        "train_loss_mean": final.get("train_loss"),
        "loss_curve": {str(s): round(v, 5) for s, v in losses if s % every == 0 or s == losses[-1][0]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--hardware", required=True, help="where it was trained, in words")
    p.add_argument("--reproduce", required=True, help="the command that reproduces the run")
    p.add_argument("--wall-s", type=float, help="wall-clock seconds of the whole run (process start to end)")
    p.add_argument("--every", type=int, default=100, help="loss curve every N steps (default 100)")
    args = p.parse_args(argv)
    out = summarize(args.model_dir, args.hardware, args.reproduce, args.wall_s, args.every)
    path = args.model_dir / "train_log_summary.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
