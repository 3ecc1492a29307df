"""Serve the test suite's scripted stand-in for a REMOTE LLM (``tests/curate/curate_standin.py``)
on 127.0.0.1, so ``multiverse curate run|eval`` can be tried end to end as a user would, with
no model: it answers every request as a perfect curator LLM would, from the known parallel form
of the record (matched by its question), with an optional fixed latency. A question it does not
know gets HTTP 500.

    .venv/bin/python scripts/curate_standin_server.py --records tasks.jsonl [--port 8765]
    .venv/bin/python scripts/curate_standin_server.py --truth tasks --n 50 [--seed 0]
    .venv/bin/python scripts/curate_standin_server.py --truth shared/data/traces/multiverse-32b --n 58

``--records``: a JSONL of records with a Multiverse ``chain`` (``python -m multiverse.eval.tasks``
writes them); ``--truth``/``--n``/``--seed``: the ground truth ``multiverse curate eval`` uses with
the same options. Prints the base URL, then serves until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "curate"))  # the stand-in LLM

from curate_standin import StandIn  # noqa: E402

from multiverse.curate import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--records", metavar="FILE.jsonl", help="records with a Multiverse 'chain' (and 'question')")
    src.add_argument("--truth", metavar="tasks|DIR", help="the ground truth of `multiverse curate eval --truth`")
    ap.add_argument("--n", type=int, default=20, help="with --truth: records (default 20, as curate eval)")
    ap.add_argument("--seed", type=int, default=0, help="with --truth tasks (default 0, as curate eval)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--latency", type=float, default=0.0, metavar="S", help="seconds added to every reply")
    args = ap.parse_args(argv)
    if args.records:
        rows = [json.loads(x) for x in Path(args.records).read_text(encoding="utf-8").splitlines() if x.strip()]
    else:
        rows = evaluate.ground_truth(args.truth, args.n, args.seed)
    records = [types.SimpleNamespace(question=r["question"], chain=r["chain"]) for r in rows]
    standin = StandIn(records, latency=args.latency)
    url = standin.start(port=args.port)
    print(f"stand-in for a remote LLM: {len(records)} records, {url}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    standin.stop()
    print(f"served {len(standin.requests)} requests", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
