"""Benchmark (not a test): 200 synthetic records through the stand-in for a REMOTE LLM with a
fixed 50 ms latency; wall time at --concurrency 1 vs 16 (goal >= 10x) and the tokens the LLM
writes per record vs the chain's own length (refill in code; on these 30-200-token chains the
fixed overhead dominates: the goal <= 0.3x is for real chains, ``benchmarks/curate_tokens.py``).

    .venv/bin/python benchmarks/curate_throughput.py [--n 200] [--latency 0.05]

Prints one JSON line (it imports the stand-in of ``tests/curate``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "curate"))  # the stand-in LLM

from curate_standin import StandIn  # noqa: E402

from multiverse.curate import journal as J  # noqa: E402
from multiverse.curate.inputs import InputRecord  # noqa: E402
from multiverse.curate.pipeline import RunConfig, run_sync  # noqa: E402
from multiverse.eval import tasks  # noqa: E402
from multiverse.format import grammar  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.05)
    args = ap.parse_args()
    recs = list(itertools.islice(tasks.iter_records(7, "train"), args.n))
    inputs = [InputRecord(r.id, r.question, grammar.flatten(r.chain), str(r.answer), "bench") for r in recs]
    standin = StandIn(recs, latency=args.latency)
    url = standin.start()
    wall: dict[int, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for conc in (1, 16):
                out = Path(tmp) / f"c{conc}"
                t0 = time.perf_counter()
                s = run_sync(RunConfig(output=out, base_url=url, model="standin-for-remote-llm", concurrency=conc), inputs)
                wall[conc] = time.perf_counter() - t0
                assert s.accepted == len(recs), s
            written = sum(len(grammar.approx_tokens(e["reply"])) for e in J.read_jsonl(out / "journal.jsonl"))
            exact = sum(row["chain"] == r.chain for row, r in zip(J.read_jsonl(out / "curated.jsonl"), recs, strict=True))
    finally:
        standin.stop()
    chain_tokens = sum(len(grammar.approx_tokens(grammar.flatten(r.chain))) for r in recs)
    print(json.dumps({"records": len(recs), "latency_s": args.latency, "wall_s_c1": round(wall[1], 2),
                      "wall_s_c16": round(wall[16], 2), "speedup": round(wall[1] / wall[16], 2),
                      "llm_output_tokens_per_chain_token": round(written / chain_tokens, 3),
                      "tokenizer": "builtin-regex (approximate)", "exact": exact}))  # fmt: skip


if __name__ == "__main__":
    main()
