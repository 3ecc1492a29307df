"""``multiverse generate``: run the fork/join engine on prompts, show the answer, the branch tree
and the usage figures (``--json`` for one machine-readable object on the last line).

Each prompt is sent as the model was trained to be asked: the user turn gets the SPEC 1.3
suffix the model directory records (:func:`multiverse.train.summary.prompt_format`: parallel for
Multiverse models, sequential for autoregressive ones) and goes through the chat template.
``--no-prompt-suffix`` keeps the chat template without the suffix, ``--raw`` sends the text as
is; stderr says which format was applied (and that none was, for a model recording none). A
prompt already ending with a SPEC 1.3 suffix is sent without a second one. The rule is
:mod:`multiverse.server.prompting`'s, which ``multiverse serve`` applies to chat requests too.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from multiverse.cli.common import (
    UsageError,
    add_device_arguments,
    add_model_argument,
    add_remote_arguments,
    add_threads_argument,
    apply_threads,
    check_device,
    load_engine,
    record_dir,
    remote_engine,
    remote_prompt_format,
    resolve_model_and_adapter,
)
from multiverse.eval.evaluate import DEFAULT_MAX_TOKENS
from multiverse.format.prompts import chat_input
from multiverse.server.prompting import apply_prompt_format, chat_prompt_format


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="*", help="prompt text(s); or use --prompts FILE (default: none)")
    add_model_argument(p)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="file with one prompt per line ('-' = stdin; default: none)")  # fmt: skip
    p.add_argument("--raw", action="store_true",
                   help="send prompts as is: no chat template, no prompt suffix (default: the model's "
                   "recorded prompt format in its chat template)")  # fmt: skip
    p.add_argument("--no-prompt-suffix", action="store_true",
                   help="chat template without the SPEC 1.3 suffix the model records (default: add the "
                   "recorded one, for OUTPUT/checkpoint-N the run's OUTPUT/train_summary.json; a model recording "
                   "none gets none, while `multiverse eval` then asks with the parallel one)")  # fmt: skip
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="parse special tokens and Multiverse tags written in a prompt (<|im_end|>, <Parallel>) as "
                   "tokens (default: a prompt is text, they stay characters; --raw sends text as is)")  # fmt: skip
    p.add_argument("--no-parallel", action="store_true", help="decode sequentially (forking off)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"sequential depth budget (default {DEFAULT_MAX_TOKENS})")  # fmt: skip
    p.add_argument("--max-total-tokens", type=int, default=None, help="budget over all branches (default: none)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=-1, help="sample among the k likeliest tokens (default -1: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: drawn from the OS per prompt; the seed used is printed, "
                   "and passing it back replays the output)")  # fmt: skip
    add_device_arguments(p)
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print a JSON object (last line) instead of text")
    add_remote_arguments(p)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            src = sys.stdin if args.prompts == "-" else open(args.prompts, encoding="utf-8")
            with src:
                prompts += [line.rstrip("\n") for line in src if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts {args.prompts}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    return prompts


def prompt_texts(prompts: list[str], tokenizer: Any, model: Any, raw: bool = False, suffix: bool = True,
                 special_tokens: bool = False) -> tuple[list[str | list[int]], str]:  # fmt: skip
    """The texts sent for ``prompts`` and a line saying which prompt format was applied (the
    rule is :mod:`multiverse.server.prompting`'s, shared with ``multiverse serve``). A chat
    prompt is text: special tokens and tags in it stay characters (then it goes as token ids,
    :func:`multiverse.format.prompts.chat_input`) unless ``special_tokens``."""
    if raw:
        return list(prompts), "prompt format: raw (--raw: sent as is)"
    fmt, note = chat_prompt_format(model, tokenizer, suffix)
    chats = [apply_prompt_format([{"role": "user", "content": p}], fmt) for p in prompts]
    return [chat_input(tokenizer, chat, special_tokens) for chat in chats], note


def run(args: argparse.Namespace) -> int:
    prompts = _prompts(args)
    if not prompts:
        raise UsageError("give a prompt or --prompts FILE")
    remote = remote_engine(args, "generate") if args.base_url else None
    if remote is None:
        model, adapter = resolve_model_and_adapter(args.model, args.adapter)
        check_device(args.device)
        threads = apply_threads(args.threads)
    from multiverse import SamplingParams

    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                        max_tokens=args.max_tokens, max_total_tokens=args.max_total_tokens,
                        parallel=not args.no_parallel)  # fmt: skip
    if remote is not None:  # the fork/join driver over --base-url servers
        llm, model, adapter = remote, " ".join(args.base_url), None
        fmt, note = remote_prompt_format(llm, args, not args.no_prompt_suffix)
        chats = [apply_prompt_format([{"role": "user", "content": p}], fmt) for p in prompts]
        texts = list(prompts) if args.raw else [chat_input(llm.tokenizer, c, args.parse_special_tokens) for c in chats]
        note = "prompt format: raw (--raw: sent as is)" if args.raw else note
    else:
        with_adapter = f" + adapter {adapter}" if adapter is not None else ""
        print(f"loading {model}{with_adapter} ({threads} thread(s)) ...", file=sys.stderr)
        llm = load_engine(model, args.device, args.dtype, adapter, cuda_graphs=args.cuda_graphs,
                          quantization=args.quantization)
        texts, note = prompt_texts(prompts, llm.tokenizer, record_dir(model, adapter), raw=args.raw,
                                   suffix=not args.no_prompt_suffix, special_tokens=args.parse_special_tokens)  # fmt: skip
    print(note, file=sys.stderr)
    outs = llm.generate(texts, sp, use_tqdm=not args.json)
    if args.json:
        rows = [{"prompt": p, "text": o.text, "finish_reason": o.finish_reason, "seed": o.seed,
                 "forking": o.forking, "tree": o.tree, "usage": _usage(o), **_remote(o)}
                for p, o in zip(prompts, outs, strict=True)]  # fmt: skip
        adapter_field = {"adapter": str(adapter)} if adapter is not None else {}
        print(json.dumps({"model": str(model), **adapter_field, "outputs": rows}))
        return 0
    for p, o in zip(prompts, outs, strict=True):
        print(f"=== {p}\n{o.text}\n--- branch tree")
        print(format_tree(o, llm.tokenizer))
        u = o.usage
        print(f"--- {u.completion_tokens} tokens ({u.forced_tokens} inserted), depth {u.depth_tokens}, "
              f"# parallel {u.parallel_degree:.2f}, {u.blocks} blocks, {u.branches} branches, "
              f"{u.seconds:.2f} s, {u.tokens_per_s:.1f} tok/s, finish: {o.finish_reason}, seed {o.seed}, "
              f"forking {o.forking}")  # fmt: skip
        if remote is not None:
            print("--- remote: " + ", ".join(f"{k} {v}" for k, v in _remote(o).items()))
    return 0


def _remote(o: Any) -> dict[str, Any]:
    """A remote output's own fields (merge mode, HTTP requests, replica, prefix-cache hit rate)."""
    names = ("merge", "http_requests", "base_url", "prefix_cache_hit_rate")
    return {n: getattr(o, n) for n in names if hasattr(o, n)}


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
