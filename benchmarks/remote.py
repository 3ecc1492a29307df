"""The fork/join driver three ways on held-out SmolLM2 word problems (both kinds), greedy, batch 1:

  * ``local``: ``LLM.generate`` on the shipped ``smollm2-multiverse`` adapter (the reference);
  * ``exact``: the driver -> a real ``multiverse serve`` over the same engine (in this process,
    uvicorn on 127.0.0.1), merge ``exact``;
  * ``flat``: the driver -> vLLM (``--vllm-url``, e.g. the one ``make vllm-test`` starts; the
    merged HF directory as ``--vllm-model``), merge ``flat``; left out without ``--vllm-url``.

Per way: accuracy (the math grader), parallel trigger rate, mean # parallel, the share of outputs
token-identical to ``local``, wall time (sum over problems) and its ratio to ``local``, HTTP
requests. Problems run one at a time, the ways interleaved per problem (less drift on a shared
CPU). ``exact_overhead`` = exact / local wall time - 1: what the server's HTTP and the driver add
to the engine's own generating (goal: at most 5%). Prints a table, then one JSON object on the
last line.

    OMP_NUM_THREADS=1 python benchmarks/remote.py [--problems 20] [--vllm-url http://127.0.0.1:8011 \\
        --vllm-model runs/vllm/mv-smollm2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # _serving
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "remote"))

ADAPTER = Path(__file__).resolve().parents[1] / "models" / "smollm2-multiverse"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--problems", type=int, default=20, help="held-out problems, half of each kind (default 20)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=700, help="depth budget per output (default 700)"
    )
    p.add_argument(
        "--vllm-url",
        default=None,
        help="a vLLM serving the merged adapter (default: no flat column)",
    )
    p.add_argument(
        "--vllm-model", default=None, help="its model directory, for the tokenizer (default: none)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--save", default=None, help="append each problem's outputs to this JSONL file (default: none)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from conftest import API_KEY, multiverse_server

    from multiverse import LLM, SamplingParams
    from multiverse.eval import tasks
    from multiverse.eval.grading import grade
    from multiverse.format.prompts import chat_prompt, stop_token_ids
    from multiverse.remote import RemoteLLM

    half = args.problems // 2
    problems = [*tasks.generate(args.problems - half, seed=0, split="test", tasks=["word_parallel"]),
                *tasks.generate(half, seed=0, split="test", tasks=["word_sequential"])]  # fmt: skip
    llm = LLM(str(ADAPTER), device="cpu", dtype="float32")
    tok = llm.tokenizer
    sp = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, stop_token_ids=stop_token_ids(tok)
    )
    prompts = [chat_prompt(tok, r.question) for r in problems]
    ways = ["local", "exact"] + (["flat"] if args.vllm_url else [])
    outs: dict[str, list] = {w: [] for w in ways}
    secs = dict.fromkeys(ways, 0.0)
    cpu = dict.fromkeys(ways, 0.0)
    llm.generate(prompts[:1], sp)  # warm-up
    with multiverse_server(llm) as (url, _):
        drivers = {"exact": RemoteLLM(url, api_key=API_KEY)}
        if args.vllm_url:
            drivers["flat"] = RemoteLLM(args.vllm_url, tokenizer=args.vllm_model)
        for k, prompt in enumerate(prompts):
            order = ways if k % 2 == 0 else ways[::-1]
            for way in order:
                engine = llm if way == "local" else drivers[way]
                if llm.radix is not None:  # every way starts cold: no hits on the other way's outputs
                    llm.radix.clear()
                t0, c0 = time.perf_counter(), time.process_time()
                out = engine.generate([prompt], sp)[0]
                secs[way] += time.perf_counter() - t0
                cpu[way] += time.process_time() - c0  # every thread: engine, server, driver
                outs[way].append(out)
            if args.save:  # each problem's outputs as they come
                row = {w: {"text": outs[w][-1].text, "blocks": outs[w][-1].usage.blocks,
                           "parallel_degree": outs[w][-1].usage.parallel_degree,
                           "identical": outs[w][-1].token_ids == outs["local"][-1].token_ids} for w in ways}  # fmt: skip
                with open(args.save, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"problem": k, "answer": str(problems[k].answer), **row}) + "\n")
            print(f"problem {k + 1}/{len(prompts)}: " + ", ".join(
                f"{w} {outs[w][-1].usage.blocks} blocks (so far {secs[w]:.1f} s, cpu {cpu[w]:.1f} s)" for w in ways),
                file=sys.stderr)  # fmt: skip
    rows = {}
    for way in ways:
        o = outs[way]
        rows[way] = {
            "accuracy": sum(
                grade(x.text, str(r.answer), "exact") for x, r in zip(o, problems, strict=True)
            )
            / len(o),
            "trigger_rate": sum(x.usage.blocks > 0 for x in o) / len(o),
            "parallel_degree": sum(x.usage.parallel_degree for x in o) / len(o),
            "token_identical": sum(
                x.token_ids == y.token_ids for x, y in zip(o, outs["local"], strict=True)
            )
            / len(o),
            "wall_s": round(secs[way], 2),
            "wall_ratio": round(secs[way] / secs["local"], 3),
            "cpu_ratio": round(cpu[way] / cpu["local"], 3),  # less noisy on a shared CPU
            "http_requests": sum(getattr(x, "http_requests", 0) for x in o),
            "merge": getattr(o[0], "merge", None),
            "prefix_cache_hit_rate": _mean([getattr(x, "prefix_cache_hit_rate", None) for x in o]),
        }
    print(
        f"{'way':6} {'accuracy':>8} {'trigger':>7} {'#par':>5} {'ident':>5} {'wall s':>8} {'ratio':>6} {'http':>5}"
    )
    for way, r in rows.items():
        print(f"{way:6} {r['accuracy']:8.3f} {r['trigger_rate']:7.2f} {r['parallel_degree']:5.2f} "
              f"{r['token_identical']:5.2f} {r['wall_s']:8.1f} {r['wall_ratio']:6.3f} {r['http_requests']:5d}")  # fmt: skip
    result = {"benchmark": "remote", "problems": len(problems), "max_tokens": args.max_tokens,
              "threads": args.threads, "ways": rows,
              "exact_overhead": round(rows["exact"]["wall_ratio"] - 1, 3)}  # fmt: skip
    print(json.dumps(result))
    return 0


def _mean(values: list) -> float | None:
    """The mean of the known values (the server's per-problem prefix-cache hit rate), or None."""
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 3) if known else None


if __name__ == "__main__":
    raise SystemExit(main())
