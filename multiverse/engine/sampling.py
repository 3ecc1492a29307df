"""Sampling parameters and the sampler (penalties, greedy, temperature, top-k, top-p, seeds).

Reproducibility: a request's seed is ``SamplingParams.seed``, or, when that is None, one the
engine draws from the OS (:func:`request_seed`; ``RequestOutput.seed`` reports it either way:
passing it back replays the request); every branch has a seed derived from the request's seed
and the branch's path labels (:func:`branch_seed`, the one rule for every branch); its ``n``-th
draw is :func:`uniform` of ``(seed, n)``, a counter-based stream with no state, so a branch
draws the same tokens whatever else is in the batch, however the scheduler interleaves
requests, and across preemption; and every sampled row of a step is drawn in one batched
operation.

Penalties (vLLM / OpenAI semantics, applied first): ``logits[t] -= presence_penalty * (count[t]
> 0) + frequency_penalty * count[t]``, where ``count[t]`` counts token ``t`` among the tokens
generated so far in the sequence the branch continues - its own tokens and, for a path, the
generated tokens before its fork (the prefix it attends, shared with its siblings), never a
sibling's tokens or the prompt; the engine's inserted tokens (``<Path>\n1:``...) count like
sampled ones (they are output tokens). After a merge the root's sequence holds every path.

Logprobs are those of the raw model distribution (``log_softmax`` of the logits, before
penalties / temperature / top-k / top-p), for the token actually taken.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from multiverse.engine.model import cpu_fused

MIN_TEMPERATURE = 1e-3  # a temperature is 0 (greedy) or at least this: logits / T stay finite
TOTAL_TOKENS_FACTOR = 4  # default max_total_tokens = TOTAL_TOKENS_FACTOR * max_tokens
MAX_PENALTY = 2.0  # presence / frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI)
_INTS = ("top_k", "max_tokens", "max_depth", "max_paths", "max_live_branches")
DEFAULT_MAX_TOKENS = 1024
"""The sequential-depth budget of a request that names none: ``SamplingParams().max_tokens``, and
so the default of every command, the server and the driver (the shipped tiny model needs up to
~300 with forking, its autoregressive twin up to ~850). :mod:`multiverse.engine.policy` re-exports
it with the rest of the request policy."""


@dataclass(slots=True)
class SamplingParams:
    """Per-request generation settings (vLLM-shaped).

    ``max_tokens`` (default :data:`DEFAULT_MAX_TOKENS`, 1024) bounds the *sequential depth* of the output (final position + 1 - the prompt's
    next position), as the released Multiverse engine did; ``max_total_tokens`` bounds the tokens
    of all branches together (engine-inserted ones included), by default
    ``TOTAL_TOKENS_FACTOR * max_tokens`` (4x; :attr:`total_budget`), so every request's work is
    bounded even when the model writes structure that never deepens (``<Path>`` after
    ``<Path>``); the KV pool bounds it too (``finish_reason="kv_capacity"``). Hitting it ends
    the request with ``finish_reason="max_total_tokens"``, the depth bound with ``"length"``.
    ``max_tokens`` above the model's context is rejected at ``LLM.add_request``. Limits on forking (``max_depth``: nesting of forked
    blocks, ``max_paths``: paths per block, ``max_live_branches``: branches decoding at once per
    request) make the engine refuse a fork, never fail: the branch then continues sequentially.

    ``serial_branches`` forks as usual but decodes one branch of the request at a time (path 1
    to its end, then path 2, ...): the same output token for token as forking on, generated
    sequentially - the like-for-like baseline of the speedup (SPEC 2).

    ``forced_output`` is a test hook: a text (or token ids) that the "model" writes instead of
    sampling (each branch writes its own part of it; logprobs are still the model's). When it
    runs out, the branch behaves as if it sampled EOS.

    ``presence_penalty`` / ``frequency_penalty`` (in ``[-2, 2]``, 0: off) lower the logits of the
    tokens already generated (module docstring: which tokens count).
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool | int = False
    prompt_logprobs: bool | int = False
    parallel: bool = True
    max_total_tokens: int | None = None
    max_depth: int = 4
    max_paths: int = 16
    max_live_branches: int = 64
    forced_output: str | list[int] | None = None
    serial_branches: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        t = self.temperature
        checks = [
            (t == 0 or t >= MIN_TEMPERATURE, f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {t}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (off) or >= 1, got {self.top_k}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            *((abs(getattr(self, name)) <= MAX_PENALTY,
               f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {getattr(self, name)}")
              for name in ("presence_penalty", "frequency_penalty")),
            (self.max_total_tokens is None or self.max_total_tokens >= 1,
             f"max_total_tokens must be >= 1 or None, got {self.max_total_tokens}"),
            (self.max_depth >= 0, f"max_depth must be >= 0, got {self.max_depth}"),
            (self.max_paths >= 1, f"max_paths must be >= 1, got {self.max_paths}"),
            (self.max_live_branches >= 1,
             f"max_live_branches must be >= 1, got {self.max_live_branches}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """A presence or frequency penalty applies (the sampler then needs the generated tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def total_budget(self) -> int:
        """The bound on all branches' tokens: ``max_total_tokens``, else ``4 * max_tokens``."""
        return self.max_total_tokens if self.max_total_tokens is not None else TOTAL_TOKENS_FACTOR * self.max_tokens


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_types(p: SamplingParams) -> None:
    """ValueError naming the field whose value has the wrong type (before any range check)."""

    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"SamplingParams: {name} must be {want}, got {getattr(p, name)!r}")

    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(name, "a finite number")
    for name in _INTS:
        if not _is_int(getattr(p, name)):
            raise bad(name, "an integer")
    for name in ("seed", "max_total_tokens"):
        if getattr(p, name) is not None and not _is_int(getattr(p, name)):
            raise bad(name, "an integer or None")
    if p.seed is not None and not -(1 << 63) <= p.seed < (1 << 64):
        raise bad("seed", "a 64-bit integer")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(p, name)
        if not isinstance(v, (bool, int)) or v < 0:
            raise bad(name, "a bool or an integer >= 0")
    for name in ("ignore_eos", "parallel", "serial_branches"):
        if not isinstance(getattr(p, name), bool):
            raise bad(name, "a bool")
    stop = p.stop
    if not (stop is None or isinstance(stop, str) or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop))):
        raise bad("stop", "a string or a list of strings")
    ids = p.stop_token_ids
    if not (ids is None or (isinstance(ids, (list, tuple, set, frozenset)) and all(_is_int(t) and t >= 0 for t in ids))):
        raise bad("stop_token_ids", "a list of token ids (integers >= 0)")
    out = p.forced_output
    if not (out is None or isinstance(out, str) or (isinstance(out, (list, tuple)) and all(_is_int(t) for t in out))):
        raise bad("forced_output", "a string or a list of token ids")


def request_seed(seed: int | None, rng: random.Random | None = None) -> int:
    """The seed a request runs with (``RequestOutput.seed``): ``seed`` when given, else a fresh
    63-bit one from ``rng`` (an engine built with ``seed=``: a replayable sequence, for tests) or,
    by default, from the OS (:mod:`secrets`): unseeded runs differ, and any run replays from its
    reported seed."""
    if seed is not None:
        return seed
    return rng.getrandbits(63) if rng is not None else secrets.randbits(63)


def branch_seed(seed: int, path: Sequence[str]) -> int:
    """A 63-bit seed for the branch at ``path`` (labels from the root) of a request seeded ``seed``."""
    if not path:
        return seed & ((1 << 63) - 1)
    digest = hashlib.blake2b(f"{seed}/{'/'.join(path)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_MASK64 = (1 << 64) - 1


def uniform(seed: int, counter: int) -> float:
    """A uniform draw in ``[0, 1)`` that depends only on ``(seed, counter)`` (splitmix64 of
    ``seed + (counter + 1) * golden``, top 53 bits): the branch's stream, random access, no state."""
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    streams: Sequence[tuple[int, int] | None],
    forced: Sequence[int | None],
    want_logprobs: Sequence[bool],
    generated: Sequence[Sequence[int] | None] | None = None,
) -> tuple[list[int], list[float | None]]:
    """One token per row of ``logits`` ``[R, vocab]`` (float32).

    ``generated[r]``: the tokens row ``r``'s branch has generated so far (module docstring),
    needed only for a row whose params are :attr:`~SamplingParams.penalized`; its penalties are
    applied to the scores it samples from (:func:`apply_penalties`), not to its logprobs.

    Row ``r`` takes ``forced[r]`` when given (a negative id means "end": returned as is, no
    logprob), else argmax (greedy) or a draw from its stream ``streams[r] = (seed, counter)``
    (:func:`uniform`; None only for greedy or forced rows; the engine passes the branch's seed
    and its token count, so a branch draws the same tokens whatever else is in the batch and
    after preemption). Greedy rows are one
    batched argmax, sampled rows one batched temperature / top-k / top-p inverse-CDF draw (the
    rows' settings and draws go to the device in one copy): no per-row kernels. Returns the
    tokens and, where ``want_logprobs[r]``, the raw model logprob of each.
    """
    rows = logits.shape[0]
    tokens: list[int | None] = list(forced)
    scores = logits
    penalized = [r for r in range(rows) if tokens[r] is None and params[r].penalized]
    if penalized:
        if generated is None or any(generated[r] is None for r in penalized):
            raise ValueError("sample: a row with a presence / frequency penalty needs its "
                             "generated tokens")
        scores = logits.float().clone()
        idx = torch.tensor(penalized, device=logits.device)
        history = [generated[r] or [] for r in penalized]
        rows_p = apply_penalties(scores.index_select(0, idx), [params[r] for r in penalized], history)
        scores.index_copy_(0, idx, rows_p)
    todo_greedy = [r for r in range(rows) if tokens[r] is None and params[r].greedy]
    todo_draw = [r for r in range(rows) if tokens[r] is None and not params[r].greedy]
    if todo_greedy:
        if len(todo_greedy) == rows:  # every row greedy: no copy of the rows (a decode step)
            picked = cpu_fused.argmax(scores)
        else:
            idx = torch.tensor(todo_greedy, device=logits.device)
            picked = scores.index_select(0, idx).argmax(-1)
        for r, t in zip(todo_greedy, picked.tolist(), strict=True):
            tokens[r] = t
    if todo_draw:
        idx = torch.tensor(todo_draw, device=logits.device)
        drawn = _draw_rows(scores.index_select(0, idx), [params[r] for r in todo_draw], [streams[r] for r in todo_draw])
        for r, t in zip(todo_draw, drawn, strict=True):
            tokens[r] = t
    out_tokens = [int(t) for t in tokens]  # type: ignore[arg-type]
    logprobs: list[float | None] = [None] * rows
    need = [r for r in range(rows) if want_logprobs[r] and out_tokens[r] >= 0]
    if need:
        idx = torch.tensor(need, device=logits.device)
        toks = torch.tensor([out_tokens[r] for r in need], device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        for r, v in zip(need, lp.gather(1, toks[:, None])[:, 0].tolist(), strict=True):
            logprobs[r] = v
    return out_tokens, logprobs


def apply_penalties(scores: torch.Tensor, params: Sequence[SamplingParams],
                    generated: Sequence[Sequence[int]]) -> torch.Tensor:  # fmt: skip
    """``scores [R, V]`` with row ``r`` lowered by ``presence_penalty * (count > 0) +
    frequency_penalty * count``, ``count [V]`` the occurrences of each token in
    ``generated[r]`` (vLLM / OpenAI semantics; a negative penalty raises). A new tensor; the
    counts go to the device in one copy."""
    r, v = scores.shape
    row_of = [i for i, ids in enumerate(generated) for _ in ids]
    flat = [t for ids in generated for t in ids]
    if any(not 0 <= t < v for t in flat):
        raise ValueError(f"apply_penalties: a generated token id is outside the vocabulary [0, {v})")
    host = torch.tensor([row_of, flat], dtype=torch.long).to(scores.device, non_blocking=True)
    counts = torch.zeros(r, v, dtype=torch.float32, device=scores.device)
    ones = torch.ones(len(flat), device=scores.device)
    counts.index_put_((host[0], host[1]), ones, accumulate=True)  # [R, V] occurrences
    pen = torch.tensor([[p.presence_penalty for p in params],
                        [p.frequency_penalty for p in params]]).to(scores.device, non_blocking=True)  # fmt: skip
    return scores.float() - pen[0, :, None] * (counts > 0) - pen[1, :, None] * counts


def _draw_rows(scores: torch.Tensor, params: Sequence[SamplingParams],
               streams: Sequence[tuple[int, int] | None]) -> list[int]:  # fmt: skip
    """Batched draws: ``scores [R, V]`` raw logits -> one token per row (see :func:`sample`).

    Top-k keeps the k highest scores, top-p then the smallest prefix (by probability after
    top-k) whose mass reaches ``top_p``; the token is where the row's uniform falls in the
    cumulative distribution of what is kept (float64)."""
    v = scores.shape[1]
    if any(st is None for st in streams):
        raise ValueError("sample: a row that draws needs its stream (seed, counter); None is only for greedy or forced rows")
    draws = [uniform(*st) for st in streams]  # type: ignore[misc]
    table = torch.tensor(
        [[p.temperature for p in params], [p.top_k if 0 < p.top_k < v else v for p in params],
         [p.top_p for p in params], draws], dtype=torch.float64,
    ).to(scores.device, non_blocking=True)  # fmt: skip
    scores = scores.float() / table[0, :, None].float()
    order = None
    if any(0 < p.top_k < v or p.top_p < 1.0 for p in params):
        scores, order = torch.sort(scores, dim=-1, descending=True)
        ranks = torch.arange(v, device=scores.device)[None, :]
        scores = scores.masked_fill(ranks >= table[1, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).double()
    if order is not None:  # drop a token when those before it already reach top_p
        probs = probs * ((torch.cumsum(probs, -1) - probs) < table[2, :, None])
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    x = torch.minimum(table[3, :, None] * total, total * (1 - 1e-12))
    idx = torch.searchsorted(cdf, x, right=True).clamp_(max=v - 1)  # first token whose mass covers x
    if order is not None:
        idx = order.gather(1, idx)
    return idx[:, 0].tolist()


def token_logprobs(logits: torch.Tensor, next_ids: Sequence[int]) -> list[float]:
    """Logprob of ``next_ids[i]`` under row ``i`` of ``logits`` (prompt logprobs)."""
    if not next_ids:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(list(next_ids), device=logits.device)
    return lp.gather(1, idx[:, None])[:, 0].tolist()
