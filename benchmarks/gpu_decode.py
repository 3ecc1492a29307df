"""The engine's decode step on a GPU: eager vs static shape vs CUDA-graph replay vs the matmul floor.

Measured in one process on one random model (default: Qwen2.5-0.5B's shape, bf16, CUDA):

1. ``step``: one decode step at batch 1 and 16 (``--context`` K/V per row): the eager step
   (``CausalLM.forward``: plan built per step, SDPA), the static-shape step run eagerly, the
   static step as a CUDA-graph replay including its input packing (``graphs``) and the replay
   alone (``replay``); ``floor`` = the model's linear layers as plain matmuls at that batch
   (``engine_vs_hf.floor_ms``). Goal: graphs <= 1.5x floor at both batch sizes.
2. ``engine``: ``LLM.generate`` of 1 and 16 requests (``--tokens`` each, EOS ignored, forking
   off), graphs on vs off: tokens/s and ms per step; ``host_ms`` = the engine's ms per step
   minus the replay alone (scheduling, bookkeeping, input packing, sampling); with graphs,
   ``capture``: the start-up capture (buckets captured and failed, seconds, MiB held).
3. ``fork``: k = 2, 4, 8 equal paths forced (``fork_speed.forced_text``), forking on vs off
   (same tokens): speedup vs # parallel (goal: speedup >= 0.9 x # parallel), with graphs and
   with eager cascade attention (shared prefixes read once; graphs cannot take those steps).

    python benchmarks/gpu_decode.py                                 # on a CUDA machine
    python benchmarks/gpu_decode.py --preset small --device cpu     # CPU smoke run (no graphs)

Prints a few lines and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from engine_vs_hf import RANDOM_CONFIGS, floor_ms  # noqa: E402
from fork_speed import forced_text  # noqa: E402

from multiverse import LLM, SamplingParams  # noqa: E402
from multiverse.engine.model import CausalLM, ForwardBatch, KVPool  # noqa: E402
from multiverse.engine.model.graphs import DecodeGraphs, EagerCapturer  # noqa: E402
from multiverse.train.bpe import default_tokenizer  # noqa: E402

SMALL = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)  # fmt: skip


def random_model(preset: str, dtype: str, device: str) -> CausalLM:
    import transformers

    kw = SMALL if preset == "small" else RANDOM_CONFIGS["random-qwen2-0.5b"]
    model = CausalLM(transformers.Qwen2Config(**kw), dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def bench_step(model: CausalLM, batch: int, context: int, reps: int) -> dict[str, Any]:
    device = model.device
    pool = KVPool.for_model(model, batch * context + 1)
    scratch = batch * context
    lists = [list(range(i * context, (i + 1) * context)) for i in range(batch)]
    rows = [(7, context - 1, x[-1]) for x in lists]
    t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    kv_t = [t(x) for x in lists]
    batch_in = ForwardBatch(t([r[0] for r in rows]), t([r[1] for r in rows]), t([r[2] for r in rows]),
                            [1] * batch, kv_t, [None] * batch)  # fmt: skip
    out = {"batch": batch, "context": context}
    out["eager_ms"] = timed_ms(lambda: model(batch_in, pool), device, reps)
    static = DecodeGraphs(model, pool.kv, scratch, max_batch=batch, max_kv=context, capturer=EagerCapturer())
    out["static_eager_ms"] = timed_ms(lambda: static.run(rows, [[x] for x in kv_t]), device, reps)
    ref = static.run(rows, [[x] for x in kv_t]).clone()
    if device.type == "cuda":
        graphs = DecodeGraphs(model, pool.kv, scratch, max_batch=batch, max_kv=context)
        got = graphs.run(rows, [[x] for x in kv_t])
        if got is None:  # its capture failed (logged with the cause): no graph figure
            out["graph_capture_failed"] = graphs.failed.get((batch, context), "no bucket")
        else:
            out["graph_vs_static_max_abs"] = float((got - ref).abs().max())
            out["graphs_ms"] = timed_ms(lambda: graphs.run(rows, [[x] for x in kv_t]), device, reps)
            out["replay_ms"] = timed_ms(graphs.replay_fn(batch, context), device, reps)
    out["floor_ms"] = floor_ms(model, batch, reps)
    best = out.get("graphs_ms", out["static_eager_ms"])
    out["step_over_floor"] = best / out["floor_ms"]
    return out


def bench_engine(model: CausalLM, tok: Any, n: int, tokens: int, graphs: bool) -> dict[str, Any]:
    cfg = {"cuda_graphs": graphs} if model.device.type == "cuda" else {}
    llm = LLM.from_model(model, tok, num_kv_slots=max(4096, n * (tokens + 64) * 2), **cfg)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, parallel=False, ignore_eos=True)
    prompts = [f"Question {i}: tell me about the number {i}." for i in range(n)]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, parallel=False, ignore_eos=True))
    sync(model.device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    sync(model.device)
    wall = time.perf_counter() - t0
    made = sum(len(o.token_ids) for o in outs)
    report = llm.runner.graphs.report if llm.runner.graphs is not None else None
    capture = None if report is None else {  # start-up: capture time and the memory the graphs hold
        "buckets": report.buckets, "captured": report.captured, "seconds": report.seconds,
        "held_mib": report.held_bytes / 2**20, "device_mib": report.device_bytes / 2**20,
        "failed": [f"{b}x{n}: {why}" for (b, n), why in report.failed.items()]}  # fmt: skip
    return {"requests": n, "graphs": graphs, "tokens": made, "wall_s": wall, "tok_per_s": made / wall,
            "ms_per_step": wall / tokens * 1e3, "static_steps": llm.runner.static_steps,
            "capture": capture}  # fmt: skip


def bench_fork(model: CausalLM, tok: Any, k: int, path_tokens: int, cascade: bool) -> dict[str, Any]:
    llm = LLM.from_model(model, tok, num_kv_slots=16384)
    llm.runner.cascade = cascade
    if cascade:
        llm.runner.cascade_min_saved_rows = 0
    text = forced_text(k, path_tokens)

    def run(parallel: bool) -> tuple[float, Any]:
        sp = SamplingParams(temperature=0.0, max_tokens=4000, forced_output=text, parallel=parallel)
        best, out = float("inf"), None
        for _ in range(2):
            sync(model.device)
            t0 = time.perf_counter()
            out = llm.generate(["Compute the parts in parallel."], sp)[0]
            sync(model.device)
            best = min(best, time.perf_counter() - t0)
        return best, out

    run(True)  # warm-up
    t_on, on = run(True)
    t_off, off = run(False)
    assert on.token_ids == off.token_ids, "forking on and off must write the same tokens"
    par = on.usage.parallel_degree
    return {"k": k, "cascade": cascade, "parallel": par, "time_on_s": t_on, "time_off_s": t_off,
            "speedup": t_off / t_on, "speedup_over_parallel": t_off / t_on / par,
            "cascade_steps": llm.runner.cascade_steps, "static_steps": llm.runner.static_steps}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "small"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--context", type=int, default=512, help="K/V per row in the step timing")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request in the engine timing")
    ap.add_argument("--path-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model = random_model(args.preset, dtype, args.device)
    tok = default_tokenizer()
    result: dict[str, Any] = {"preset": args.preset, "device": args.device, "dtype": dtype,
                              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}  # fmt: skip
    result["step"] = [bench_step(model, b, args.context, args.reps) for b in (1, 16)]
    for r in result["step"]:
        print(f"step b={r['batch']:2d}: eager {r['eager_ms']:.3f} ms, static {r['static_eager_ms']:.3f} ms, "
              f"graphs {r.get('graphs_ms', float('nan')):.3f} ms (replay {r.get('replay_ms', float('nan')):.3f}), "
              f"floor {r['floor_ms']:.3f} ms -> {r['step_over_floor']:.2f}x floor", file=sys.stderr)  # fmt: skip
    on_cuda = args.device.startswith("cuda")
    result["engine"] = [bench_engine(model, tok, n, args.tokens, g) for n in (1, 16) for g in ((True, False) if on_cuda else (False,))]
    replay = {r["batch"]: r.get("replay_ms", r["static_eager_ms"]) for r in result["step"]}
    for r in result["engine"]:
        r["host_ms"] = r["ms_per_step"] - replay[r["requests"]] if r["graphs"] else None
        print(f"engine n={r['requests']:2d} graphs={r['graphs']}: {r['tok_per_s']:.1f} tok/s, "
              f"{r['ms_per_step']:.3f} ms/step", file=sys.stderr)  # fmt: skip
    result["fork"] = [bench_fork(model, tok, k, args.path_tokens, c) for k in (2, 4, 8) for c in (False, True)]
    for r in result["fork"]:
        print(f"fork k={r['k']} cascade={r['cascade']}: speedup {r['speedup']:.2f} at # parallel "
              f"{r['parallel']:.2f} -> {r['speedup_over_parallel']:.2f}", file=sys.stderr)  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
