"""One record through the five steps: summarise, parallelise, skeleton, refill, Map/Reduce.

:meth:`Curator.curate` returns an :class:`Outcome`: accepted (with the ``curated.jsonl`` row)
or rejected (with the reasons). Every LLM request goes through :meth:`Curator.ask`, which
first looks the request up in the journal (a resumed run repeats no finished request), then
validates the reply and, when it fails, makes ONE repair call quoting the validator's
messages; a truncated reply (``finish_reason: length``) counts as a failed reply.

Regeneration: when the checks fail, steps 3-5 run again (the plan is kept), the Map/Reduce
requests now carrying the previous attempt's problems, up to ``max_regen`` more times.
Raises :class:`StopIntake` when the request budget is spent (the record stays pending) and
:class:`~multiverse.curate.client.ClientError` when the endpoint fails for good.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from multiverse.curate import checks, prompts, refill, skeleton, validate
from multiverse.curate import units as U
from multiverse.curate.inputs import InputRecord
from multiverse.curate.journal import Journal, request_key


class StopIntake(Exception):
    """The run's request budget is spent."""


class ReplyInvalid(Exception):
    def __init__(self, step: str, errors: list[str]):
        self.step, self.errors = step, errors
        super().__init__(f"{step}: reply still invalid after one repair: {'; '.join(errors)}")


@dataclass(slots=True)
class Budget:
    """Limits of one run: requests sent, tokens used (prompt + completion), cost in dollars
    (``price_in`` / ``price_out`` per million tokens). ``None`` = no limit. Checked before
    each request; the request that crosses a token or cost limit still completes."""

    max_requests: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None
    price_in: float = 0.0
    price_out: float = 0.0
    sent: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cost(self) -> float:
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def take(self) -> None:
        if self.max_requests is not None and self.sent >= self.max_requests:
            raise StopIntake(f"--max-requests {self.max_requests} reached")
        if self.max_tokens is not None and self.prompt_tokens + self.completion_tokens >= self.max_tokens:
            raise StopIntake(f"--max-tokens {self.max_tokens} reached")
        if self.max_cost is not None and self.cost >= self.max_cost:
            raise StopIntake(f"--max-cost {self.max_cost} reached (${self.cost:.4f})")
        self.sent += 1

    def spent(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens


@dataclass(slots=True)
class Outcome:
    id: str
    accepted: bool
    row: dict[str, Any]
    reasons: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Usage:
    requests: int = 0
    repairs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    invalid: list[str] = field(default_factory=list)


class Curator:
    def __init__(self, client: Any, journal: Journal, *, max_regen: int = 2, threshold: float = checks.THRESHOLD,
                 budget: Budget | None = None, max_chars: int = U.MAX_CHARS):  # fmt: skip
        self.client = client
        self.journal = journal
        self.max_regen = max_regen
        self.threshold = threshold
        self.budget = budget or Budget()
        self.max_chars = max_chars
        self.cached = 0  # requests answered from the journal

    async def _request(self, rec_id: str, step: str, messages: list[dict[str, str]], usage: _Usage) -> dict[str, Any]:
        version = prompts.version(step)
        key = request_key(rec_id, step, messages, version, self.client.model, self.client.sampling)
        entry = self.journal.get(key)
        if entry is None:
            self.budget.take()
            comp = await self.client.complete(messages)
            self.budget.spent(comp.prompt_tokens, comp.completion_tokens)
            entry = {"record": rec_id, "step": step, "reply": comp.text, "finish_reason": comp.finish_reason,
                     "usage": [comp.prompt_tokens, comp.completion_tokens]}  # fmt: skip
            self.journal.put(key, entry)
        else:
            self.cached += 1
        usage.requests += 1
        usage.prompt_tokens += entry["usage"][0]
        usage.completion_tokens += entry["usage"][1]
        return entry

    async def ask(self, rec_id: str, step: str, payload: dict[str, Any], usage: _Usage, **context: Any) -> Any:
        """One validated reply of ``step`` (see the module docstring)."""
        messages = prompts.messages(step, payload)
        for attempt in range(2):
            entry = await self._request(rec_id, step, messages, usage)
            if entry["finish_reason"] == "length":
                errors = ["the reply was cut off at the length limit (finish_reason: length); give a shorter reply"]
            else:
                result, errors = validate.parse_reply(step, entry["reply"], **context)
                if not errors:
                    return result
            usage.invalid.append(f"{step}: {errors[0]}")
            if attempt == 0:
                usage.repairs += 1
                messages = prompts.repair(messages, entry["reply"], errors)
        raise ReplyInvalid(step, errors)

    async def curate(self, rec: InputRecord) -> Outcome:
        usage = _Usage()
        norm = U.normalise(rec.chain)
        units = U.split_units(norm, self.max_chars)
        base = {"id": rec.id, "question": rec.question, "answer": rec.answer, "source": rec.source}
        if not units:
            return self._reject(rec, base, ["input: the chain is empty"], usage, [], stage="input")
        unit_json = [{"n": u.index, "text": u.text} for u in units]
        try:
            steps = await self.ask(rec.id, "summarise", {"step": "summarise", "question": rec.question,
                                   "num_units": len(units), "units": unit_json}, usage, num_units=len(units))  # fmt: skip
            groups = await self.ask(rec.id, "parallelise", {"step": "parallelise", "question": rec.question,
                                    "steps": [s.to_json() for s in steps], "units": unit_json}, usage, steps=steps)  # fmt: skip
        except ReplyInvalid as e:
            return self._reject(rec, base, [str(e)], usage, [], stage=e.step)
        attempts: list[dict[str, Any]] = []
        problems: list[str] = []
        stage = "checks"
        for attempt in range(1 + self.max_regen):
            try:
                chain, items, edits = await self._build(rec, units, steps, groups, usage, problems, attempt)
            except ReplyInvalid as e:
                problems, stage = [str(e)], e.step
                attempts.append({"attempt": attempt, "reasons": problems})
                continue
            planned = skeleton.paths_per_block(items)
            result = checks.run_checks(chain, norm, planned, self.threshold)
            attempts.append({"attempt": attempt, **result.to_json(), "edits": edits})
            if result.passed:
                row = {**base, "chain": chain, "sequential_chain": f"<Think>\n{norm}\n</Think>", **rec.extra,
                       "curation": self._meta(usage, attempts, planned, steps, groups, result.distance)}  # fmt: skip
                return Outcome(rec.id, True, row, [])
            problems, stage = result.reasons, "checks"
        return self._reject(rec, base, problems, usage, attempts, stage=stage)

    async def _build(self, rec: InputRecord, units: list[U.Unit], steps: Any, groups: Any, usage: _Usage,
                     problems: list[str], attempt: int) -> tuple[str, list[skeleton.SkItem], list[dict[str, Any]]]:  # fmt: skip
        """Steps 3-5 once: skeleton, refill, Map/Reduce per block (innermost first), render."""
        items = skeleton.build(steps, groups)
        texts = {u.index: u.text for u in units}
        seps = {u.index: u.sep or "\n" for u in units}
        edits: list[dict[str, Any]] = []
        order = skeleton.unit_order(items)
        summary = {s.id: " ".join(s.summary.split()) for top in steps for s in (top, *top.substeps)}
        for _, blk in skeleton.iter_blocks(items):
            paths = [refill.render_container(p.items, texts, seps, "").rstrip("\n") for p in blk.paths]
            first = next(u for u in skeleton.unit_order([blk]))
            before = [texts[u] for u in order[: order.index(first)]][-3:]
            outlines = [summary.get(sid, "") for sid in blk.steps]
            payload: dict[str, Any] = {"step": "mapreduce", "question": rec.question, "before": "\n".join(before),
                                       "paths": paths, "outlines": outlines}  # fmt: skip
            if attempt:  # a regeneration: a new request, told what went wrong
                payload["attempt"] = attempt + 1
                payload["previous_attempt_problems"] = problems
            reply = await self.ask(rec.id, "mapreduce", payload, usage, num_paths=len(blk.paths), outlines=outlines)
            blk.outlines = [refill.outline_text(o, str(k + 1)) for k, o in enumerate(reply.outlines)]
            blk.conclusion = " ".join(reply.conclusion.split())
            edits += [r.to_json() for r in refill.apply_edits(blk, reply.edits, texts)]
        return refill.render(items, units, texts), items, edits

    def _meta(self, usage: _Usage, attempts: list[dict[str, Any]], planned: list[int], steps: Any,
              groups: Any, distance: float) -> dict[str, Any]:  # fmt: skip
        return {
            "model": self.client.model,
            "prompt_versions": prompts.versions(),
            "sampling": dict(self.client.sampling),
            "attempts": len(attempts),
            "attempt_log": attempts,
            "distance": round(distance, 6),
            "blocks": len(planned),
            "paths_per_block": planned,
            "steps": [s.to_json() for s in steps] if steps else [],
            "groups": [g.to_json() for g in groups] if groups else [],
            "requests": usage.requests,
            "repairs": usage.repairs,
            "invalid_replies": usage.invalid,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
        }

    def _reject(self, rec: InputRecord, base: dict[str, Any], reasons: list[str], usage: _Usage,
                attempts: list[dict[str, Any]], stage: str) -> Outcome:  # fmt: skip
        meta = self._meta(usage, attempts, [], None, None, attempts[-1].get("distance", 1.0) if attempts else 1.0)
        row = {**base, "chain": rec.chain, "stage": stage, "reasons": reasons, "curation": meta}
        return Outcome(rec.id, False, row, reasons)
