"""Shared helpers for the engine tests: a tiny random Qwen2 and the full-sequence reference."""

from __future__ import annotations

import torch

from multiverse.engine.llm import LLM
from multiverse.engine.model import CausalLM
from multiverse.format import grammar
from multiverse.format.layout import layout


def tiny_pair(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32):
    """(transformers Qwen2ForCausalLM, our CausalLM with the same random weights)."""
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    ours = CausalLM(cfg)
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


def full_logprobs(hf, tokenizer, ids: list[int], parallel: bool = True) -> torch.Tensor:
    """Log-softmax of one transformers forward over ``ids`` with the layout rule's mask and
    positions (plain causal with ``parallel=False``): ``[n, vocab]``."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        if parallel:
            lay = layout(ids, grammar.tag_ids(tokenizer))
            logits = hf(input_ids=ids_t, position_ids=lay.position_ids[None],
                        attention_mask=lay.hf_attention_mask(torch.float32)).logits[0]  # fmt: skip
        else:
            logits = hf(input_ids=ids_t).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check_output(hf, tokenizer, out, parallel: bool = True, atol: float = 1e-4) -> int:
    """Assert the engine's positions and per-token logprobs equal the full forward's.

    Returns how many logprobs were compared (sampled tokens; engine-inserted ones have none)."""
    n0 = len(out.prompt_token_ids)
    ids = out.prompt_token_ids + out.token_ids
    if parallel:
        lay = layout(ids, grammar.tag_ids(tokenizer))
        assert lay.position_ids[n0:].tolist() == out.position_ids
    else:
        assert out.position_ids == list(range(n0, len(ids)))
    ref = full_logprobs(hf, tokenizer, ids, parallel)
    compared = 0
    if out.logprobs is not None:
        for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            if lp is None:
                continue
            assert abs(ref[n0 + i - 1, tok].item() - lp) < atol, (i, tokenizer.decode([tok]))
            compared += 1
    if out.prompt_logprobs is not None:
        assert out.prompt_logprobs[0] is None
        for i in range(1, n0):
            assert abs(ref[i - 1, ids[i]].item() - out.prompt_logprobs[i]) < atol, i
    return compared


def assert_no_leak(llm: LLM) -> None:
    llm.kv.check_invariants()
    if llm.radix is not None:
        llm.radix.clear()
    llm.kv.check_invariants()
    assert llm.kv.num_free == llm.kv.num_slots, f"{llm.kv.num_used} KV slots still in use"


def block(labels_and_bodies: list[tuple[str, str]], conclusion: str = "ok") -> str:
    """Canonical text of one <Parallel> block."""
    out = ["<Parallel>\n<Goal>\n"]
    for label, _ in labels_and_bodies:
        out.append(f"<Outline>\n{label}: do {label}\n</Outline>\n")
    out.append("</Goal>\n")
    for label, body in labels_and_bodies:
        out.append(f"<Path>\n{label}: {body}\n</Path>\n")
    out.append(f"<Conclusion>\n{conclusion}\n</Conclusion>\n</Parallel>\n")
    return "".join(out)
