"""``multiverse inspect`` at scale: wall time and peak memory on generated documents of 1, 10
and 50 MB (one ``<Think>`` with prose and Parallel blocks, a third of the paths holding a
nested block), each inspected by a fresh ``python -m multiverse.cli inspect`` process.

    python benchmarks/inspect_scale.py [--sizes 1 10 50] [--json] [--malformed] [--repo DIR]

``--repo DIR`` runs the CLI of another checkout (e.g. main, for a before/after comparison in
one run). Peak RSS and CPU time (user + system) are the child's own (``os.wait4``); on a
shared machine compare CPU time. Prints one line per size, then a JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of and a to in is we so then count each step number total left right value sum".split()


def document(size: int, seed: int = 0, malformed: bool = False) -> str:
    """A Multiverse text of about ``size`` characters. ``malformed``: every 7th block has a
    lower-cased ``</path>``, text inside its Goal, and no ``</Parallel>`` closing it."""
    rng = random.Random(seed)

    def prose(n: int) -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(n))
        return f"{words} {rng.randint(0, 999)} + {rng.randint(0, 99)} = {rng.randint(0, 1099)}.\n"

    def block(depth: int, prefix: str, bad: bool) -> str:
        labels = [f"{prefix}{i + 1}" for i in range(rng.randint(2, 4))]
        out = ["<Parallel>\n<Goal>\n", "stray words\n" if bad else ""]
        out += [f"<Outline>\n{label}: {prose(6)}</Outline>\n" for label in labels]
        out.append("</Goal>\n")
        for label in labels:
            out.append(f"<Path>\n{label}: {prose(12)}")
            if depth < 2 and rng.random() < 0.3:
                out += [block(depth + 1, label + ".", False), "\n"]
            out += [prose(8), "</path>\n" if bad else "</Path>\n"]
        out.append(f"<Conclusion>\n{prose(8)}</Conclusion>\n{'' if bad else '</Parallel>'}")
        return "".join(out)

    parts, n, k = ["<Think>\n"], 8, 0
    while n < size:
        k += 1
        part = (
            prose(20) + "Let's think in parallel.\n" + block(1, "", malformed and k % 7 == 0) + "\n"
        )
        parts.append(part)
        n += len(part)
    parts.append("</Think>\nAnswer: 42\n")
    return "".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", type=float, nargs="+", default=[1, 10, 50], help="MB (default 1 10 50)"
    )
    ap.add_argument(
        "--json", action="store_true", help="time `inspect --json` (default: the text report)"
    )
    ap.add_argument(
        "--malformed", action="store_true", help="every 7th block broken (issues on every page)"
    )
    ap.add_argument(
        "--repo", type=Path, default=REPO, help="checkout whose CLI runs (default: this one)"
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes:
            path = Path(tmp) / f"doc_{mb:g}mb.txt"
            path.write_text(document(int(mb * 1e6), malformed=args.malformed), encoding="utf-8")
            row = {"mb": mb, **measure(args.repo, path, args.json)}
            rows.append(row)
            print(f"{mb:>6g} MB: {row['wall_s']:7.2f} s ({row['cpu_s']:.2f} s CPU)  peak RSS {row['peak_rss_mb']:7.0f} MB  "
                  f"(exit {row['rc']}, {row['out_lines']} output lines)", flush=True)  # fmt: skip
    print(json.dumps({"benchmark": "inspect_scale", "repo": str(args.repo), "json": args.json,
                      "malformed": args.malformed, "rows": rows}))  # fmt: skip


def measure(repo: Path, path: Path, as_json: bool) -> dict:
    """Wall time and the child's peak RSS (MB) of one ``inspect`` run."""
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "multiverse.cli", "inspect", str(path)] + (
        ["--json"] if as_json else []
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = sum(1 for _ in out)
        if rc != 0:
            err.seek(0)
            raise SystemExit(f"inspect {path.name} failed (exit {rc}): {err.read()[-2000:]}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),  # steadier than wall on a busy host
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "rc": rc,
        "out_lines": lines,
    }


if __name__ == "__main__":
    main()
