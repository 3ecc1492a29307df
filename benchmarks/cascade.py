"""Cascade (shared-prefix) decode attention vs the plain per-branch gather, forking on.

The shipped ``models/multiverse-tiny`` answers held-out ``countdown`` problems (six paths per
answer) at several batch sizes, greedily, with ``ModelRunner.cascade`` off and on in
alternating order; both write identical tokens (checked). Reported per batch size:
``plain_s``, ``cascade_s`` (total over the repetitions), ``ratio`` = plain / cascade (> 1: the
cascade path is faster) and the decode steps that ran with groups. The default threshold
(``CASCADE_MIN_SAVED_ROWS``) decides when groups are used; ``--min-saved-rows 0`` groups every
family. Prints a table, then one JSON object on the last line.

    OMP_NUM_THREADS=1 python benchmarks/cascade.py [--batch-sizes 1 8 16] [--reps 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiverse import LLM, SamplingParams  # noqa: E402
from multiverse.engine.runner import CASCADE_MIN_SAVED_ROWS  # noqa: E402
from multiverse.eval.datasets import load_benchmark  # noqa: E402
from multiverse.format.prompts import chat_prompt, stop_token_ids  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "multiverse-tiny"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--min-saved-rows", type=int, default=CASCADE_MIN_SAVED_ROWS)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady timings on a shared CPU)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, device="cpu", dtype="float32")
    if not llm.runner.cascade:
        print("cascade attention is off on this device", file=sys.stderr)
        return 2
    llm.runner.cascade_min_saved_rows = args.min_saved_rows
    tok = llm.tokenizer
    problems = load_benchmark("synthetic", max(args.batch_sizes), tasks=["countdown"])
    prompts = [chat_prompt(tok, x.question) for x in problems]
    sp = SamplingParams(temperature=0.0, max_tokens=1024, parallel=True, stop_token_ids=stop_token_ids(tok))
    llm.generate(prompts[:2], sp)  # warm-up
    rows = []
    for b in args.batch_sizes:
        total = {False: 0.0, True: 0.0}
        texts: dict[bool, list[str]] = {}
        steps0 = llm.runner.cascade_steps
        for rep in range(args.reps):
            for cascade in (False, True) if rep % 2 == 0 else (True, False):
                llm.runner.cascade = cascade
                start = time.perf_counter()
                outs = llm.generate(prompts[:b], sp)
                total[cascade] += time.perf_counter() - start
                texts[cascade] = [o.text for o in outs]
        if texts[False] != texts[True]:
            print(f"batch {b}: outputs differ between the two paths", file=sys.stderr)
            return 1
        rows.append({
            "batch": b,
            "plain_s": round(total[False], 3),
            "cascade_s": round(total[True], 3),
            "ratio": round(total[False] / total[True], 3),
            "grouped_steps_per_run": (llm.runner.cascade_steps - steps0) // args.reps,
        })  # fmt: skip
        r = rows[-1]
        print(f"batch {b:3d}: plain {r['plain_s']:.3f} s, cascade {r['cascade_s']:.3f} s, "
              f"plain/cascade {r['ratio']:.3f}, grouped steps per run {r['grouped_steps_per_run']}")  # fmt: skip
    print(json.dumps({"model": str(args.model), "threads": torch.get_num_threads(), "reps": args.reps,
                      "min_saved_rows": args.min_saved_rows, "results": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
