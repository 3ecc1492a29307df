"""Streaming cost: engine steps per second with 16 streaming requests at 256 vs 2,048 generated
tokens, on the shipped ``multiverse-tiny``.

The engine thread of ``multiverse serve`` steps the engine and then asks each streaming
request's :class:`~multiverse.server.streaming.BranchStreamer` what is new; this does the same
in one loop, without HTTP. Each request writes a fixed text (the engine's ``forced_output``;
multi-byte characters included) until ``max_tokens``, so every cell runs the same steps; each
cell starts from an empty prefix cache (it does not inherit the last cell's slot layout). Modes:

* ``none``: no streaming (the engine alone);
* ``full``: the reference streamer, every branch's text re-decoded after every step (the old
  cost: it grows with the length);
* ``incremental``: the streamer as served (only the new tokens are decoded).

Per (tokens, mode): ``steps_per_s`` over the whole run and ``stream_ms_per_step`` (time in the
streamers; ``stream_steps_per_s``: the steps per second if the engine step itself were free;
``stream_ms_first_256`` / ``_last_256``: within one run, a short and a long text, same load),
the best of ``--repeat`` runs (the modes interleaved: a shared machine is noisy);
``steps_per_cpu_s``: the same per second of process CPU time (less sensitive to other jobs). Prints a
table, then one JSON object on the last line with the 2,048 / 256 ratios per mode (goal:
within 10% for ``incremental``) and ``streaming_vs_none``: per length, each streaming mode's
steps/s over ``none``'s (the streamer's own cost, apart from the engine's). On a CPU the engine's
own step grows with the context (the attention reads every earlier token), so ``none`` shows
what is the engine's part.

``--kv-runs 0,64``: the same cells with each K/V run length
(:class:`~multiverse.engine.kv_manager.KVManager`'s ``run``; 0: one slot at a time, as before
runs), in alternating order per repeat (A B, B A, ...); the JSON then has the ratios per run
length under ``kv_runs``.

``--profile``: instead, one run per length of mode ``none`` under ``cProfile``, the engine step
split into milliseconds per step: the K/V gather (``index_select``), attention (SDPA or the
one-pass kernel, :mod:`multiverse.engine.model.attention.native`), the step's plan (slot index
and its check, the runner's slot mirrors), the linear layers, the RMS norms, other torch calls
and Python (each call counted once, in its own time), plus the Python calls per step (a count
that grows with the context would be O(context) Python work in a step), the K/V bytes a step
reads on average (every sequence's context, all layers: ``kv_mb_per_step``) and that over the
attention time (``attention_gb_per_s``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = "alpha beta gamma délta € 😀 epsilon\n"


def run_cell(
    llm: Any, requests: int, tokens: int, mode: str, stop: list[str] | None
) -> dict[str, Any]:
    from multiverse.engine.sampling import SamplingParams
    from multiverse.server.streaming import BranchStreamer

    if llm.radix is not None:  # a cell starts from an empty prefix cache, not the last cell's slots
        llm.radix.clear()
    text = WORDS * (tokens // 4 + 8)  # more tokens than max_tokens: every request runs to the end
    sp = SamplingParams(
        temperature=0.0, max_tokens=tokens, forced_output=text, parallel=False, stop=stop
    )
    reqs = [llm.add_request(f"stream {i}", sp) for i in range(requests)]
    streamers = {
        r.id: BranchStreamer(llm.tokenizer, incremental=mode == "incremental") for r in reqs
    }
    steps, in_stream, chars, per_step = 0, 0.0, 0, []
    t0, c0 = time.perf_counter(), time.process_time()
    while llm.requests:
        llm.step()
        steps += 1
        if mode == "none":
            continue
        t1 = time.perf_counter()
        for r in reqs:
            if not r.finished:
                chars += len(streamers[r.id].update(r)[0])
        per_step.append(time.perf_counter() - t1)
        in_stream += per_step[-1]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = [llm.output(r) for r in reqs]
    assert all(len(o.token_ids) == tokens for o in out), [len(o.token_ids) for o in out]
    return {"tokens": tokens, "mode": mode, "steps": steps, "seconds": round(wall, 3),
            "steps_per_s": round(steps / wall, 2),
            "steps_per_cpu_s": round(steps / cpu, 2), "stream_ms_per_step": round(1e3 * in_stream / steps, 3),
            "stream_steps_per_s": round(steps / in_stream, 1) if in_stream else None,
            # the same run's streaming time at its first and its last 256 steps (the same load)
            "stream_ms_first_256": round(1e3 * sum(per_step[:256]) / 256, 3) if per_step else None,
            "stream_ms_last_256": round(1e3 * sum(per_step[-256:]) / 256, 3) if per_step else None,
            "streamed_chars": chars}  # fmt: skip


PARTS = {"kv_gather": ("index_select",),
         # the compiled one-pass kernel's time is its Python wrapper's own (ctypes calls are not profiled)
         "attention": ("scaled_dot_product_attention", "native.py:decode_attention", "softmax"),
         "plan": ("build_attention_plan", "native.py:per_sequence", "native.py:grouped", "native.py:check",
                  "check_forward_batch", "runner.py:_attend_tensor", "runner.py:_groups"),
         "linear": ("_linear_pointwise", "addmm", "built-in method torch._C._nn.linear", "mm}"),
         "rms_norm": ("rms_norm",)}  # fmt: skip


def profile_cell(llm: Any, requests: int, tokens: int) -> dict[str, Any]:
    """Mode ``none`` under cProfile: ms per engine step by part (see the module docstring)."""
    import cProfile
    import pstats

    prof = cProfile.Profile(time.process_time)  # CPU time: the machine is shared
    prof.enable()
    cell = run_cell(llm, requests, tokens, "none", None)
    prof.disable()
    steps = cell["steps"]
    from multiverse.engine.model import KVPool

    prompt = len(llm.tokenizer.encode("stream 0", add_special_tokens=False))  # run_cell's prompts
    per_token = KVPool.bytes_per_slot(llm.model.config, llm.model.dtype)
    kv_mb = requests * (prompt + (tokens + 1) / 2) * per_token / 1e6  # the mean context a step
    parts = dict.fromkeys([*PARTS, "other_torch", "python"], 0.0)
    calls = 0
    for (file, _, name), (_, ncalls, tottime, _, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        label = f"{file}:{name}"
        part = next((p for p, keys in PARTS.items() if any(k in label for k in keys)), None)
        if part is None:
            part = "other_torch" if file == "~" and "torch" in name else "python"
        parts[part] += tottime
        calls += ncalls if file != "~" else 0
    return {"tokens": tokens, "steps": steps, "python_calls_per_step": round(calls / steps, 1),
            "ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in parts.items()},
            "total_ms_per_step": round(1e3 * sum(parts.values()) / steps, 3),
            "kv_mb_per_step": round(kv_mb, 2),
            "attention_gb_per_s": round(kv_mb * steps / 1e3 / max(parts["attention"], 1e-9), 2)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument(
        "--tokens", default="256,2048", help="comma-separated generated tokens per request"
    )
    p.add_argument("--modes", default="none,full,incremental")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        help="a stop string every request carries (never hit)",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per cell; the best counts")
    p.add_argument(
        "--kv-runs",
        default=None,
        help="comma-separated K/V run lengths to compare (KVManager.run; 0: one slot at a time); "
        "default: the engine's",
    )
    p.add_argument("--profile", action="store_true", help="where a mode-none step's time goes")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: cli.common's rule)"
    )
    args = p.parse_args()

    from multiverse.cli.common import apply_threads
    from multiverse.engine.llm import LLM
    from multiverse.locations import find_model

    threads = apply_threads(args.threads)
    lengths = [int(x) for x in args.tokens.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    llm = LLM(
        str(find_model()), device=args.device, num_kv_slots=args.requests * (max(lengths) + 64)
    )
    run_cell(llm, 2, 32, "incremental", args.stop)  # warm-up
    if args.profile:
        prof = [profile_cell(llm, args.requests, tokens) for tokens in lengths]
        for c in prof:
            parts = "  ".join(f"{k} {v:.3f}" for k, v in c["ms_per_step"].items())
            print(f"{c['tokens']:>6} tokens  {c['total_ms_per_step']:.3f} ms/step: {parts}  "
                  f"({c['python_calls_per_step']} Python calls a step; K/V {c['kv_mb_per_step']} MB "
                  f"a step read at {c['attention_gb_per_s']} GB/s)")  # fmt: skip
        print(json.dumps({"benchmark": "stream_cost", "profile": prof, "model": "multiverse-tiny",
                          "device": args.device, "threads": threads, "requests": args.requests}))  # fmt: skip
        return 0
    kv_runs = [int(x) for x in args.kv_runs.split(",") if x] if args.kv_runs else [llm.kv.run]
    if any(r < 0 for r in kv_runs):
        p.error("--kv-runs: lengths must be >= 0")
    runs: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
    for tokens in lengths:
        for rep in range(args.repeat):
            for kv_run in kv_runs if rep % 2 == 0 else kv_runs[::-1]:  # A B, B A, ...
                llm.kv.run = kv_run
                for mode in modes:
                    cell = {**run_cell(llm, args.requests, tokens, mode, args.stop), "kv_run": kv_run}
                    runs.setdefault((tokens, mode, kv_run), []).append(cell)
                    print(f"{tokens:>6} tokens  run {kv_run:<4} {mode:<12} rep {rep + 1}  {cell['steps_per_s']:9.2f} steps/s  "
                          f"stream {cell['stream_ms_per_step']:8.3f} ms/step", flush=True)  # fmt: skip
    by = {}
    for key, cs in runs.items():
        best = max(cs, key=lambda c: c["steps_per_s"])
        fast = min(cs, key=lambda c: c["stream_ms_per_step"])
        by[key] = {**best, "stream_ms_per_step": fast["stream_ms_per_step"], "stream_steps_per_s": fast["stream_steps_per_s"],
                   "steps_per_s_runs": [c["steps_per_s"] for c in cs]}  # fmt: skip
    cells = list(by.values())
    for c in cells:
        print(f"best: {c['tokens']:>6} tokens  run {c['kv_run']:<4} {c['mode']:<12} {c['steps_per_s']:9.2f} steps/s  "
              f"{c['steps_per_cpu_s']:9.2f} steps/cpu-s  stream {c['stream_ms_per_step']:8.3f} ms/step")  # fmt: skip
    per_run = {r: _ratios(by, lengths, modes, r) for r in kv_runs}
    main_run = llm.kv.run if args.kv_runs is None else kv_runs[-1]
    print(json.dumps({"benchmark": "stream_cost", "model": "multiverse-tiny", "device": args.device, "threads": threads,
                      "requests": args.requests, "stop": args.stop, "cells": cells, "repeat": args.repeat,
                      **per_run[main_run], "kv_run": main_run,
                      "kv_runs": {str(r): v for r, v in per_run.items()} if len(kv_runs) > 1 else None}))  # fmt: skip
    return 0


def _ratios(by: dict[tuple[int, str, int], dict[str, Any]], lengths: list[int], modes: list[str],
            kv_run: int) -> dict[str, Any]:  # fmt: skip
    """The 2,048 / 256 ratios per mode and each streaming mode's steps/s over ``none``'s per
    length, for one K/V run length."""
    lo, hi = min(lengths), max(lengths)

    def ratio(field: str, only: list[str]) -> dict[str, float]:
        return {m: round(by[(hi, m, kv_run)][field] / by[(lo, m, kv_run)][field], 3) for m in only}

    streamed = [m for m in modes if m != "none"]
    out = {f"steps_per_s_ratio_{hi}_vs_{lo}": ratio("steps_per_s", modes),
           f"steps_per_cpu_s_ratio_{hi}_vs_{lo}": ratio("steps_per_cpu_s", modes),
           f"stream_steps_per_s_ratio_{hi}_vs_{lo}": ratio("stream_steps_per_s", streamed)}  # fmt: skip
    if "none" in modes:
        out["streaming_vs_none"] = {
            str(t): {m: round(by[(t, m, kv_run)]["steps_per_s"] / by[(t, "none", kv_run)]["steps_per_s"], 3)
                     for m in streamed}
            for t in lengths
        }  # fmt: skip
    return out


if __name__ == "__main__":
    raise SystemExit(main())
