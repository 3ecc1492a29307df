"""Merge a LoRA adapter (e.g. models/smollm2-multiverse) into a plain Hugging Face model directory
that any engine loads (vLLM, SGLang): config.json + model.safetensors (float32) + the adapter's
tokenizer (with the tags) and chat template + generation_config.json (the chat stop ids).

    python scripts/export_merged.py models/smollm2-multiverse OUT_DIR

The base is the one the adapter records (its train_summary.json), resized for the tags exactly as
the engine loads it (multiverse.engine.adapter); the merge is peft's merge_and_unload.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path


def export_merged(adapter_dir: Path, out_dir: Path) -> Path:
    from peft import PeftModel

    from multiverse.engine.adapter import load_hf_model, prepare_base, resolve_base
    from multiverse.engine.policy import end_ids
    from multiverse.format.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(adapter_dir)
    base = resolve_base(None, adapter_dir)
    hf = load_hf_model(base)
    prepare_base(hf, tokenizer, base)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        merged = PeftModel.from_pretrained(hf, str(adapter_dir)).merge_and_unload().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.to("cpu").float().save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    gen = {"eos_token_id": sorted(end_ids(tokenizer)), "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")
    for name in ("train_summary.json", "chat_template.jinja"):  # the record: prompt format, tasks
        src = adapter_dir / name
        if src.is_file() and not (out_dir / name).exists():
            (out_dir / name).write_text(src.read_text())
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "adapter", type=Path, help="a LoRA adapter directory (models/smollm2-multiverse)"
    )
    p.add_argument("out", type=Path, help="where the merged model directory goes")
    args = p.parse_args()
    print(export_merged(args.adapter, args.out))


if __name__ == "__main__":
    main()
