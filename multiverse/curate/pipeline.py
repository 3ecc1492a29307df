"""A whole curation run: inputs -> ``DIR/curated.jsonl`` + ``DIR/rejected.jsonl``, resumable.

Files in the output directory:
  * ``journal.jsonl``: every finished LLM request (:mod:`multiverse.curate.journal`);
  * ``curated.jsonl``: accepted rows, directly a ``multiverse train --data`` file
    (``id, question, chain, answer, sequential_chain, source, curation``);
  * ``rejected.jsonl``: ``id, question, chain`` (the original), ``stage``, ``reasons``;
  * ``run.json``: the last run's counters (inputs, accepted, rejected, pending, requests,
    retries, cached requests, tokens, wall time, why intake stopped).

Contract: rows are written in input order (a record finished early waits for the ones before
it), each row is one flushed line (``fsync`` ed with ``fsync=True``), and a record is written once: records already in either
output file are skipped on start, so re-running the same command resumes, and a killed run
(``kill -9`` included) continued to the end gives the same ``curated.jsonl`` bytes as an
uninterrupted one. Intake stops cleanly at ``max_requests`` / ``max_tokens`` / ``max_cost`` or on :meth:`Run.stop` (Ctrl-C):
what is in flight finishes or stays pending (its finished requests are journaled).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from multiverse.curate.client import ChatClient, ClientError
from multiverse.curate.curator import Budget, Curator, Outcome, StopIntake
from multiverse.curate.inputs import InputRecord
from multiverse.curate.journal import Journal, append_line, read_jsonl, repair_tail

REFUSED = "the endpoint refused the request"  # RunSummary.stopped starts with it: see ClientError.refused


@dataclass(slots=True)
class RunConfig:
    output: Path
    base_url: str
    model: str
    api_key: str | None = None
    concurrency: int = 8
    max_regen: int = 2
    threshold: float = 0.2
    max_requests: int | None = None
    max_tokens: int | None = None  # prompt + completion tokens of the whole run
    max_cost: float | None = None
    price_in: float = 0.0  # dollars per million prompt tokens
    price_out: float = 0.0
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 0.5
    temperature: float = 0.0
    request_max_tokens: int = 4096  # completion tokens per request (sampling)
    fsync: bool = False  # fsync every journal and output line (power-loss safe, slower)


@dataclass(slots=True)
class RunSummary:
    inputs: int = 0
    unusable_inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    pending: int = 0
    skipped_done: int = 0
    requests: int = 0
    completions: int = 0
    cached_requests: int = 0
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    errors: list[str] = field(default_factory=list)
    stopped: str = ""
    model: str = ""
    threshold: float = 0.2
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def done_ids(output: Path) -> set[str]:
    ids: set[str] = set()
    for name in ("curated.jsonl", "rejected.jsonl"):
        repair_tail(output / name)
        ids |= {str(r["id"]) for r in read_jsonl(output / name) if "id" in r}
    return ids


class Run:
    """One run over ``records``; ``client`` may be given (tests), else made from the config."""

    def __init__(self, config: RunConfig, client: Any | None = None, progress: Any | None = None):
        self.config = config
        self.client = client
        self.progress = progress  # callable(summary) after each record, or None
        self.summary = RunSummary(model=config.model, threshold=config.threshold)
        self._stop = asyncio.Event()

    def stop(self, reason: str = "stopped by the user") -> None:
        if not self.summary.stopped:
            self.summary.stopped = reason
        self._stop.set()

    async def run(self, records: list[InputRecord], unusable: int = 0) -> RunSummary:
        cfg, t0 = self.config, time.perf_counter()
        cfg.output.mkdir(parents=True, exist_ok=True)
        finished = done_ids(cfg.output)
        todo = [r for r in records if r.id not in finished]
        s = self.summary
        s.inputs, s.unusable_inputs, s.skipped_done = len(records), unusable, len(records) - len(todo)
        own_client = self.client is None
        client = self.client or ChatClient(cfg.base_url, cfg.model, cfg.api_key, timeout=cfg.timeout,
                                           max_retries=cfg.max_retries, backoff=cfg.backoff,
                                           temperature=cfg.temperature, max_tokens=cfg.request_max_tokens)  # fmt: skip
        journal = Journal(cfg.output / "journal.jsonl", cfg.fsync)
        curator = Curator(client, journal, max_regen=cfg.max_regen, threshold=cfg.threshold,
                          budget=Budget(cfg.max_requests, cfg.max_tokens, cfg.max_cost, cfg.price_in, cfg.price_out))  # fmt: skip
        results: dict[int, Outcome | None] = {}
        state = {"next_take": 0, "next_write": 0, "blocked": False}
        with (cfg.output / "curated.jsonl").open("a", encoding="utf-8") as good, \
             (cfg.output / "rejected.jsonl").open("a", encoding="utf-8") as bad:  # fmt: skip

            def flush() -> None:
                while not state["blocked"] and state["next_write"] in results:
                    out = results.pop(state["next_write"])
                    if out is None:  # pending: later rows wait for the next run (input order)
                        state["blocked"] = True
                        return
                    append_line(good if out.accepted else bad, out.row, cfg.fsync)
                    state["next_write"] += 1
                    if out.accepted:
                        s.accepted += 1
                    else:
                        s.rejected += 1

            async def worker() -> None:
                while not self._stop.is_set() and state["next_take"] < len(todo):
                    k = state["next_take"]
                    state["next_take"] += 1
                    results[k] = await self._one(curator, todo[k])
                    flush()
                    self._count(client, curator)
                    if self.progress:
                        self.progress(s)

            try:
                await asyncio.gather(*(worker() for _ in range(max(1, cfg.concurrency))))
            finally:
                journal.close()
                if own_client:
                    await client.aclose()
        s.pending = len(todo) - state["next_write"]
        self._count(client, curator)
        s.wall_s = round(time.perf_counter() - t0, 3)
        (cfg.output / "run.json").write_text(json.dumps(s.to_json(), indent=2) + "\n", encoding="utf-8")
        return s

    def _count(self, client: Any, curator: Curator) -> None:
        s, st = self.summary, client.stats
        s.cached_requests = curator.cached
        s.requests, s.completions, s.retries = st.requests, st.completions, st.retries
        s.retry_reasons = dict(st.retry_reasons)
        s.prompt_tokens, s.completion_tokens = st.prompt_tokens, st.completion_tokens
        s.cost = round(curator.budget.cost, 6)

    async def _one(self, curator: Curator, rec: InputRecord) -> Outcome | None:
        try:
            out = await curator.curate(rec)
        except StopIntake as e:
            self.stop(str(e))
            return None
        except ClientError as e:
            self.summary.errors.append(f"{rec.id}: {e}")
            if e.refused:  # a wrong key, URL or model: rejecting records would hide them from the fixed rerun
                self.stop(f"{REFUSED}: {e}; check --base-url, --model and the API key")
                return None
            if not e.permanent:
                return None
            row = {"id": rec.id, "question": rec.question, "answer": rec.answer, "source": rec.source,
                   "chain": rec.chain, "stage": "request", "reasons": [f"request: {e}"], "curation": {}}  # fmt: skip
            return Outcome(rec.id, False, row, row["reasons"])
        return out


def run_sync(config: RunConfig, records: list[InputRecord], unusable: int = 0, client: Any | None = None) -> RunSummary:
    """:meth:`Run.run` from synchronous code (a fresh event loop)."""
    return asyncio.run(Run(config, client).run(records, unusable))
