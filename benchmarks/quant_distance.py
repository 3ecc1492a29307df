"""How far each weight format puts the Multiverse adapter (SmolLM2-135M-Instruct + the shipped
adapter) from float32, teacher-forced on float32's own greedy outputs: which part of a quantised
path moves the model, measured rather than guessed.

Problems: the first ``--parallel`` parallel and ``--sequential`` sequential problems of the 40
held-out ones of ``engine_vs_vllm.py --quality`` (the same seed), answered greedily by float32
with forking off (the text the model reads flat). Each variant runs ``forward_full`` over prompt +
answer; at each answer position: KL(float32 || variant) of the next-token distribution, whether
the argmax is float32's, and whether a differing argmax was a near tie in float32 (top-2 logprob
margin <= ``--margin`` nats) or not.

Variants (``--variants``; the shipped paths and, as float32 matrices, formats the engine does not
have, so none needs a kernel):

- ``int8``, ``int4``: ``CausalLM.quantize_`` as shipped, the fast paths (``forward_full`` runs
  more than 16 rows: torch's bfloat16-activation kernels);
- ``int8-ref``, ``int4-ref``: the same weights dequantised (``CausalLM.dequantized``): the format
  alone, float32 matmuls;
- ``int8-delta``: int8 (one scale a row) of the base weights, the adapter's delta added in
  float32 (what int4 does);
- ``int8-g32``, ``int8-g64``: symmetric int8 with one scale per 32 / 64 inputs of a row (bfloat16
  scales, like ours), LM head included;
- ``int8-f32head``, ``int4-f32head``: the ``-ref`` weights with the LM head left float32;
- ``int4-merged``: int4 of the merged weights (the delta not kept).

Prints a line per variant on stderr, one JSON object on the last line of stdout. Minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from multiverse import LLM, SamplingParams  # noqa: E402
from multiverse.engine.model.layer import QUANTIZED  # noqa: E402
from multiverse.engine.model.quant import QuantLinear  # noqa: E402

ADAPTER = REPO / "models" / "smollm2-multiverse"
VARIANTS = ("int8", "int8-ref", "int8-delta", "int8-g32", "int8-g64", "int8-f32head", "int4",
            "int4-ref", "int4-f32head", "int4-merged")  # fmt: skip


def int8_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """``w`` through symmetric int8 with one bfloat16 scale per ``group`` inputs of a row."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int8 group {group} does not divide {k} inputs")
    x = w.float().reshape(n, k // group, group)
    scale = (x.abs().amax(-1, keepdim=True) / 127).to(torch.bfloat16).float().clamp(min=2**-100)
    return (torch.round(x / scale).clamp(-127, 127) * scale).reshape(n, k)


def with_weights(base: Any, fmt, head: bool, keep_delta: bool = False) -> Any:
    """A float32 copy of ``base`` whose projection matrices are ``fmt(W)`` (``fmt(W_base) +
    delta`` with ``keep_delta``) and whose LM head is ``fmt(head)`` (float32, tied, if not
    ``head``)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for name in QUANTIZED:
                w = getattr(layer, name).contiguous().float()
                if keep_delta:
                    b = base.adapter_base[i][name].float()
                    w = fmt(b) + (w - b)
                else:
                    w = fmt(w)
                delattr(layer, name)
                setattr(layer, name, nn.Parameter(w, requires_grad=False))
        if head:
            model.lm_head = nn.Parameter(fmt(model.embed.detach().float()), requires_grad=False)
    model.adapter_base = None
    return model.float()  # nn.Module._apply: the model's weight cache and packed copy made anew


def variant(base: Any, name: str) -> Any:
    def row8(w: torch.Tensor) -> torch.Tensor:
        return QuantLinear("int8", w).dequantize()

    def g4(w: torch.Tensor) -> torch.Tensor:
        return QuantLinear("int4", w, 32).dequantize()

    if name in ("int8", "int4"):
        return copy.deepcopy(base).quantize_(name)  # int4 keeps the delta (adapter_base)
    if name == "int4-merged":
        model = copy.deepcopy(base)
        model.adapter_base = None
        return model.quantize_("int4")
    if name == "int8-ref":
        return with_weights(base, row8, head=True)
    if name == "int8-delta":
        return with_weights(base, row8, head=True, keep_delta=True)
    if name in ("int8-g32", "int8-g64"):
        group = int(name.removeprefix("int8-g"))
        return with_weights(base, lambda w: int8_groups(w, group), head=True)
    if name == "int8-f32head":
        return with_weights(base, row8, head=False)
    if name == "int4-ref":  # int4 layers with the delta kept, int8 head (quantize_'s choice)
        model = with_weights(base, g4, head=False, keep_delta=True)
        model.lm_head = nn.Parameter(row8(base.embed.detach().float()), requires_grad=False)
        return model
    if name == "int4-f32head":
        return with_weights(base, g4, head=False, keep_delta=True)
    raise ValueError(f"variant {name!r}: expected one of {VARIANTS}")


def answers(model: Any, tok: Any, parallel: int, sequential: int) -> list[tuple[torch.Tensor, int]]:
    """(prompt + float32's greedy answer, prompt length) for the held-out problems."""
    from multiverse.eval import tasks
    from multiverse.format.prompts import chat_prompt, stop_token_ids

    recs = [*tasks.generate(20, seed=7, split="test", tasks=["word_parallel"])[:parallel],
            *tasks.generate(20, seed=7, split="test", tasks=["word_sequential"])[:sequential]]  # fmt: skip
    llm = LLM.from_model(model, tok, num_kv_slots=16384)
    sp = SamplingParams(
        temperature=0.0, max_tokens=1500, parallel=False, stop_token_ids=stop_token_ids(tok)
    )
    outs = llm.generate([chat_prompt(tok, r.question, parallel=True) for r in recs], sp)
    return [
        (torch.tensor([*o.prompt_token_ids, *o.token_ids]), len(o.prompt_token_ids)) for o in outs
    ]


def distance(
    model: Any, seqs: list[tuple[torch.Tensor, int]], ref: list[torch.Tensor], margin: float
) -> dict[str, Any]:
    kl = 0.0
    tokens = flips = robust = 0
    with torch.inference_mode():
        for (ids, n), lr in zip(seqs, ref, strict=True):
            lq = F.log_softmax(model.forward_full(ids)[n - 1 : -1].float(), -1)
            kl += float((lr.exp() * (lr - lq)).sum())
            top = lr.topk(2, -1).values
            differ = lr.argmax(-1) != lq.argmax(-1)
            tokens += len(lr)
            flips += int(differ.sum())
            robust += int((differ & (top[:, 0] - top[:, 1] > margin)).sum())
    return {"mean_kl": round(kl / tokens, 6), "argmax_agreement": round(1 - flips / tokens, 5),
            "argmax_flips": flips, f"flips_float32_margin_over_{margin}": robust}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parallel", type=int, default=6, help="parallel problems (of 20)")
    ap.add_argument("--sequential", type=int, default=20, help="sequential problems (of 20)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--margin", type=float, default=0.5, help="near tie: top-2 margin (nats)")
    args = ap.parse_args(argv)
    if not (0 <= args.parallel <= 20 and 0 <= args.sequential <= 20) or not (
        args.parallel + args.sequential
    ):
        ap.error("--parallel and --sequential: 0-20 each, not both 0")
    torch.set_num_threads(1)
    from multiverse.engine.loader import load_model

    base, tok, _ = load_model(ADAPTER, keep_adapter_base=True)  # the base weights, for the delta
    seqs = answers(base, tok, args.parallel, args.sequential)
    with torch.inference_mode():
        ref = [F.log_softmax(base.forward_full(s)[n - 1 : -1].float(), -1) for s, n in seqs]
    tokens = sum(len(r) for r in ref)
    print(f"{len(seqs)} problems, {tokens} answer tokens", file=sys.stderr)
    result: dict[str, Any] = {"benchmark": "quant_distance", "problems": len(seqs),
                              "tokens": tokens, "torch": torch.__version__, "variants": {}}  # fmt: skip
    for name in args.variants:
        t0 = time.perf_counter()
        model = variant(base, name)
        result["variants"][name] = distance(model, seqs, ref, args.margin)
        del model
        print(f"{name:13s} {result['variants'][name]} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
