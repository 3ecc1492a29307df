"""``multiverse train`` under ``torchrun`` with two CPU processes (gloo backend).

Both ranks train (each step's batch is split over the two processes, so an epoch of 8
records with ``--batch-size 2`` takes 2 steps, not 4), and only the main process writes the
output directory and prints: the data report and the summary line appear once in stdout,
the log has one line per logged step, the summary records the run once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multiverse.eval import tasks

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    work = tmp_path_factory.mktemp("ddp")
    data = work / "train.jsonl"
    tasks.write_jsonl(data, tasks.generate(8, seed=1, tasks=["countdown_warmup"]))
    out = work / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "multiverse.cli", "train", "--config", "qwen2-micro", "--data", str(data),
           "--output", str(out), "--max-steps", str(STEPS), "--batch-size", "2", "--lr", "1e-3",
           "--device", "cpu", "--save-steps", "1000", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc, out


def test_summary_and_report_are_printed_once(run):
    proc, out = run
    assert proc.stdout.count(f"trained {STEPS} steps") == 1
    assert proc.stdout.count("8 records read") == 1
    assert "Traceback" not in proc.stderr


def test_output_is_complete_and_written_once(run):
    proc, out = run
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "train_log.jsonl", "train_summary.json"):  # fmt: skip
        assert (out / name).is_file(), name
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))  # one line per step, not two
    assert [e["epoch"] for e in steps] == [0.5, 1.0, 1.5]  # 4 records a step: both ranks trained
    assert sum("train_runtime" in e for e in log) == 1
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["tasks"] == ["countdown_warmup"]
    assert summary["records"] == 8 and summary["mode"] == "multiverse"
