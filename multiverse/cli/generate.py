"""``multiverse generate``: run the fork/join engine on prompts, show the answer, the branch tree
and the usage figures (``--json`` for one machine-readable object on the last line)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from multiverse.cli.common import (
    UsageError,
    add_device_arguments,
    add_model_argument,
    resolve_model,
)
from multiverse.eval.evaluate import DEFAULT_MAX_TOKENS
from multiverse.format.prompts import render_chat, stop_token_ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="*", help="prompt text(s); or use --prompts FILE")
    add_model_argument(p)
    p.add_argument("--prompts", default=None, help="file with one prompt per line ('-' = stdin)")
    p.add_argument("--raw", action="store_true", help="send prompts as is (default: chat template)")
    p.add_argument("--no-parallel", action="store_true", help="decode sequentially (forking off)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"sequential depth budget (default {DEFAULT_MAX_TOKENS})")  # fmt: skip
    p.add_argument("--max-total-tokens", type=int, default=None, help="budget over all branches")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=-1, help="sample among the k likeliest tokens (default -1: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    add_device_arguments(p)
    p.add_argument("--json", action="store_true", help="print a JSON object (last line) instead of text")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        src = sys.stdin if args.prompts == "-" else open(args.prompts, encoding="utf-8")
        with src:
            prompts += [line.rstrip("\n") for line in src if line.strip()]
    return prompts


def run(args: argparse.Namespace) -> int:
    prompts = _prompts(args)
    if not prompts:
        print("multiverse generate: give a prompt or --prompts FILE", file=sys.stderr)
        return 2
    try:
        model = resolve_model(args.model)
    except UsageError as e:
        print(f"multiverse generate: error: {e}", file=sys.stderr)
        return 2
    from multiverse import LLM, SamplingParams

    try:
        sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, max_total_tokens=args.max_total_tokens,
                            parallel=not args.no_parallel)  # fmt: skip
    except ValueError as e:
        print(f"multiverse generate: {e}", file=sys.stderr)
        return 2
    print(f"loading {model} ...", file=sys.stderr)
    llm = LLM(str(model), device=args.device, dtype=args.dtype)
    sp.stop_token_ids = stop_token_ids(llm.tokenizer)
    has_template = bool(getattr(llm.tokenizer, "chat_template", None))
    texts = prompts if args.raw or not has_template else [
        render_chat(llm.tokenizer, [{"role": "user", "content": p}]) for p in prompts
    ]  # fmt: skip
    outs = llm.generate(texts, sp, use_tqdm=not args.json)
    if args.json:
        rows = [{"prompt": p, "text": o.text, "finish_reason": o.finish_reason, "tree": o.tree,
                 "usage": _usage(o)} for p, o in zip(prompts, outs, strict=True)]  # fmt: skip
        print(json.dumps({"model": str(model), "outputs": rows}))
        return 0
    for p, o in zip(prompts, outs, strict=True):
        print(f"=== {p}\n{o.text}\n--- branch tree")
        print(format_tree(o, llm.tokenizer))
        u = o.usage
        print(f"--- {u.completion_tokens} tokens ({u.forced_tokens} inserted), depth {u.depth_tokens}, "
              f"# parallel {u.parallel_degree:.2f}, {u.blocks} blocks, {u.branches} branches, "
              f"{u.seconds:.2f} s, {u.tokens_per_s:.1f} tok/s, finish: {o.finish_reason}")  # fmt: skip
    return 0


def _usage(o: Any) -> dict[str, Any]:
    return {f: getattr(o.usage, f) for f in o.usage.__slots__}


def format_tree(out: Any, tokenizer: Any, width: int = 60) -> str:
    """The branch tree as indented text: each block with its paths, their token counts and text."""

    def snippet(a: int, b: int) -> str:
        text = tokenizer.decode(out.token_ids[a:b], skip_special_tokens=False).replace("\n", "⏎")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = [f"main: {len(out.token_ids)} tokens"]

    def walk(blocks: list[dict[str, Any]], indent: str) -> None:
        for i, blk in enumerate(blocks):
            last_block = i == len(blocks) - 1
            lines.append(f"{indent}{'└' if last_block else '├'}─ block [{blk['start']}:{blk['end']}] "
                         f"{len(blk['paths'])} paths")  # fmt: skip
            inner = indent + ("   " if last_block else "│  ")
            for j, path in enumerate(blk["paths"]):
                last = j == len(blk["paths"]) - 1
                n = path["end"] - path["start"]
                lines.append(f"{inner}{'└' if last else '├'}─ {path['label']}: {n} tokens  "
                             f"{snippet(path['start'], path['end'])}")  # fmt: skip
                walk(path["blocks"], inner + ("   " if last else "│  "))

    walk(out.tree["blocks"], "")
    return "\n".join(lines)
