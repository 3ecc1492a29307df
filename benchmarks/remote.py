"""The fork/join driver three ways on held-out SmolLM2 word problems (both kinds), greedy, batch 1:

  * ``local``: ``LLM.generate`` on the shipped ``smollm2-multiverse`` adapter (the reference);
  * ``exact``: the driver -> a real ``multiverse serve`` over the same engine (in this process,
    uvicorn on 127.0.0.1), merge ``exact``;
  * ``flat``: the driver -> vLLM (``--vllm-url``, e.g. the one ``make vllm-test`` starts; the
    merged HF directory as ``--vllm-model``), merge ``flat``; left out without ``--vllm-url``;
  * ``vllm_exact``: the driver -> a vLLM with the Multiverse plugin (``--vllm-exact-url``: the
    position hook and the KV connector, docs/scale-out.md), merge ``exact``; with it, the vLLM
    ways also report vLLM's prefix-cache hits and the connector's hits (``/metrics``, tokens).

Per way: accuracy (the math grader), parallel trigger rate, mean # parallel, the share of outputs
token-identical to ``local``, wall time (sum over problems) and its ratio to ``local``, HTTP
requests; for ``local`` and ``exact`` (the server runs on the same engine) the engine's steps and
tokens computed (``tokens_vs_local``: what the server prefills again). Problems run one at a
time, the ways interleaved per problem (less drift on a shared CPU), every way from an empty
prefix cache. ``exact_overhead`` = exact / local wall time - 1: what the server's HTTP and the driver add
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # _serving (tests/remote/conftest)
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
    p.add_argument("--vllm-exact-url", default=None,
                   help="a vLLM with the Multiverse plugin serving the merged adapter (default: no vllm_exact row)")
    p.add_argument("--logprobs", action="store_true",
                   help="ask every way for logprobs and report each way's largest difference from local "
                        "over the outputs token-identical to it (default: off)")
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
        temperature=0.0, max_tokens=args.max_tokens, stop_token_ids=stop_token_ids(tok), logprobs=args.logprobs
    )
    prompts = [chat_prompt(tok, r.question) for r in problems]
    ways = ["local", "exact"] + (["flat"] if args.vllm_url else []) + (["vllm_exact"] if args.vllm_exact_url else [])
    hits = {w: [0.0, 0.0, 0.0] for w in ways}  # vLLM's prefix-cache hits, queries; connector hits
    outs: dict[str, list] = {w: [] for w in ways}
    secs = dict.fromkeys(ways, 0.0)
    last = dict.fromkeys(ways, 0.0)  # each way's wall time on the problem at hand
    cpu = dict.fromkeys(ways, 0.0)
    llm.generate(prompts[:1], sp)  # warm-up
    # what the engine computes for each way (the exact way's server runs on this same engine)
    tally = {w: [0, 0, 0] for w in ("local", "exact")}  # steps, tokens, of them in multi-token chunks
    current, run = ["local"], llm.runner.run

    def counted(works):
        t = tally.get(current[0])
        if t is not None:
            t[0] += 1
            t[1] += sum(w.count for w in works)
            t[2] += sum(w.count for w in works if w.count > 1)
        return run(works)

    llm.runner.run = counted
    with multiverse_server(llm) as (url, _):
        drivers = {"exact": RemoteLLM(url, api_key=API_KEY)}
        if args.vllm_url:
            drivers["flat"] = RemoteLLM(args.vllm_url, tokenizer=args.vllm_model)
        if args.vllm_exact_url:
            drivers["vllm_exact"] = RemoteLLM(args.vllm_exact_url, tokenizer=args.vllm_model, merge="exact")
        for k, prompt in enumerate(prompts):
            order = ways if k % 2 == 0 else ways[::-1]
            for way in order:
                engine = llm if way == "local" else drivers[way]
                if llm.radix is not None:  # every way starts cold: no hits on the other way's outputs
                    llm.radix.clear()
                before = _counters(drivers[way].infos[0].base_url) if way in ("flat", "vllm_exact") else None
                current[0] = way
                t0, c0 = time.perf_counter(), time.process_time()
                out = engine.generate([prompt], sp)[0]
                secs[way] += time.perf_counter() - t0
                last[way] = time.perf_counter() - t0
                cpu[way] += time.process_time() - c0  # every thread: engine, server, driver
                if before is not None:
                    after = _counters(drivers[way].infos[0].base_url)
                    hits[way] = [h + a - b for h, a, b in zip(hits[way], after, before, strict=True)]
                outs[way].append(out)
            if args.save:  # each problem's outputs as they come
                row = {w: {"text": outs[w][-1].text, "blocks": outs[w][-1].usage.blocks,
                           "parallel_degree": outs[w][-1].usage.parallel_degree,
                           "identical": outs[w][-1].token_ids == outs["local"][-1].token_ids,
                           "wall_s": round(last[w], 2), "max_logprob_diff": _lp_diff(outs[w][-1], outs["local"][-1])}
                       for w in ways}  # fmt: skip
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
        if way in tally:
            steps, tokens, chunks = tally[way]
            rows[way].update(engine_steps=steps, tokens_computed=tokens, chunk_tokens=chunks,
                             tokens_vs_local=round(tokens / tally["local"][1], 3))  # fmt: skip
        if args.logprobs and way != "local":
            diffs = [d for x, y in zip(o, outs["local"], strict=True) if (d := _lp_diff(x, y)) is not None]
            rows[way]["max_logprob_diff"] = max(diffs, default=None)
        if way in ("flat", "vllm_exact"):
            h, q, ext = hits[way]
            rows[way].update(prefix_cache_hit_tokens=int(h), prefix_cache_query_tokens=int(q),
                             prefix_cache_hit_rate=round(h / q, 3) if q else None, connector_hit_tokens=int(ext))
    print(
        f"{'way':6} {'accuracy':>8} {'trigger':>7} {'#par':>5} {'ident':>5} {'wall s':>8} {'ratio':>6} {'http':>5}"
    )
    for way, r in rows.items():
        print(f"{way:6} {r['accuracy']:8.3f} {r['trigger_rate']:7.2f} {r['parallel_degree']:5.2f} "
              f"{r['token_identical']:5.2f} {r['wall_s']:8.1f} {r['wall_ratio']:6.3f} {r['http_requests']:5d}")  # fmt: skip
    result = {"benchmark": "remote", "problems": len(problems), "max_tokens": args.max_tokens,
              "threads": args.threads, "ways": rows,
              "exact_overhead": round(rows["exact"]["wall_ratio"] - 1, 3)}  # fmt: skip
    if "flat" in rows and "vllm_exact" in rows:  # the plugin's cost: exact vs flat on the same vLLM build
        result["vllm_exact_vs_flat_wall"] = round(secs["vllm_exact"] / secs["flat"], 3)
    print(f"tokens computed by the engine: local {tally['local'][1]} in {tally['local'][0]} steps, exact (the "
          f"server) {tally['exact'][1]} in {tally['exact'][0]} steps ({rows['exact']['tokens_vs_local']}x), server "
          f"prefix-cache hit rate {rows['exact']['prefix_cache_hit_rate']}; CPU time exact/local "
          f"{rows['exact']['cpu_ratio']}")  # fmt: skip
    for way in ("flat", "vllm_exact"):
        if way in rows:
            r = rows[way]
            print(f"{way}: vLLM prefix-cache hits {r['prefix_cache_hit_tokens']}/{r['prefix_cache_query_tokens']} tokens "
                  f"({r['prefix_cache_hit_rate']}), connector hits {r['connector_hit_tokens']} tokens")
    print(json.dumps(result))
    return 0


def _lp_diff(x, y) -> float | None:
    """The largest |logprob difference| between two token-identical outputs (None otherwise)."""
    if x.token_ids != y.token_ids or not x.logprobs or not y.logprobs:
        return None
    return max((abs(a - b) for a, b in zip(x.logprobs, y.logprobs, strict=True) if a is not None and b is not None),
               default=None)  # fmt: skip


def _counters(base_url: str) -> tuple[float, float, float]:
    """vLLM's (prefix-cache hit tokens, queried tokens, KV-connector hit tokens) now (/metrics)."""
    import httpx

    from multiverse.remote.transport import metric_values

    v = metric_values(httpx.get(f"{base_url}/metrics", timeout=30).text)
    names = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total")
    return v.get(names[0], 0.0), v.get(names[1], 0.0), v.get(names[2], 0.0)


def _mean(values: list) -> float | None:
    """The mean of the known values (the server's per-problem prefix-cache hit rate), or None."""
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 3) if known else None


if __name__ == "__main__":
    raise SystemExit(main())
