"""One request's branch tree, driven by tokens from a server instead of a model.

It *is* the engine's bookkeeping: a :class:`~multiverse.engine.request.Request`, the engine's
:class:`~multiverse.engine.forkjoin.ForkJoin` transitions and a
:class:`~multiverse.engine.kv_manager.KVManager` used as a virtual pool (its slots stand for
tokens the server holds; no K/V exists here). So every rule is the engine's, from one source:
where a fork happens, the outline labels, the tokens inserted (``\\n``, ``<Path>\\n{label}:``,
``</Path>\\n``, ``<Conclusion>\\n``), the per-path seeds, the SPEC 4 bounds (``max_tokens`` on
the depth, ``max_total_tokens``, ``max_depth``, ``max_paths``, ``max_live_branches``; a refused
fork continues sequentially), EOS and stop ids, stop strings, ``"malformed"``, and the output
(:func:`~multiverse.engine.outputs.build_output`: text, token ids, forced mask, positions,
tree, usage).

The driver asks the server to continue a branch (:meth:`Tree.context`: the branch's sequence,
i.e. the prefix up to its fork + its own tokens) and hands the tokens back (:meth:`Tree.feed`),
one at a time through :meth:`ForkJoin.on_sampled`, as the engine takes each sampled token. The
server's tokens stay valid while the branch took exactly them: once the engine's rules insert a
token, end the branch or finish the request, the rest of that completion is dropped (and the
driver asks again from the new context).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from multiverse.engine.forkjoin import ForkJoin, Specials
from multiverse.engine.kv_manager import KVManager
from multiverse.engine.outputs import RequestOutput, build_output
from multiverse.engine.request import Branch, Request, Status
from multiverse.engine.sampling import branch_seed

__all__ = ["Tree"]

SLOT_MARGIN = 64


class Tree:
    """The branch tree of one request (see the module docstring)."""

    def __init__(self, prompt_ids: Sequence[int], params: Any, specials: Specials | None,
                 tag_names: dict[int, str], eos_ids: frozenset[int], decode: Callable[[list[int]], str],
                 seed: int) -> None:  # fmt: skip
        names = tag_names if params.parallel else {}
        self.req = Request.create(
            0, prompt_ids, params, names, seed=seed, t_arrival=time.perf_counter()
        )
        # A virtual pool as large as the request can ever get: only the bounds refuse a fork.
        self.kv = KVManager(len(self.req.prompt_ids) + params.total_budget + SLOT_MARGIN)
        self.fj = ForkJoin(self.kv, decode, specials, eos_ids=eos_ids)
        self.requests_of: dict[Branch, int] = {}  # completions asked for, per branch
        self.settle()

    # -- the engine's transitions ----------------------------------------------------------
    def settle(self) -> None:
        """*Compute* every pending token whose prefix is there (a virtual slot each) and run the
        engine's transitions (fork, path end, merge), until nothing changes."""
        req, changed = self.req, True
        while changed and not req.finished:
            changed = False
            for br in req.branches():
                if req.finished:
                    break
                parent = br.parent
                ready = parent is None or (parent.resident and parent.num_pending == 0)
                if br.num_pending and br.status is not Status.FINISHED and ready:
                    br.take_slots(self.kv.allocate(br, br.num_pending), masked=False)
                    self.fj.on_computed(br)
                    changed = True

    def wanting(self) -> list[Branch]:
        """Branches that sample next (running, everything computed), in pre-order."""
        if self.req.finished:
            return []
        return [b for b in self.req.branches() if b.status is Status.RUNNING and not b.num_pending]

    def feed(
        self, br: Branch, token_ids: Sequence[int], logprobs: Sequence[float | None] | None
    ) -> int:
        """Give ``br`` the tokens a server generated from :meth:`context`; returns how many it
        took before the rules changed its course (the rest is no longer its continuation)."""
        want_lp = bool(self.req.params.logprobs)
        for i, tok in enumerate(token_ids):
            if self.req.finished or br.status is not Status.RUNNING or br.num_pending:
                return i
            n = len(br.own_ids)
            lp = logprobs[i] if (want_lp and logprobs is not None) else None
            self.fj.on_sampled(br, int(tok), lp)
            self.settle()
            if len(br.own_ids) != n + 1 or br.own_ids[-1] != tok or br.status is not Status.RUNNING:
                return i + 1
        return len(token_ids)

    def end_branch(self, br: Branch, reason: str) -> None:
        """End ``br`` as the engine ends a branch at a bound (a child is closed and merged)."""
        self.fj.end_branch(br, reason)
        self.settle()

    def finish(self, reason: str, error: str | None = None) -> None:
        """Finish the request now (``"abort"``, ``"error"``): unmerged paths are folded in."""
        if not self.req.finished:
            self.fj.finish(self.req, reason, error=error)
        if not self.req.t_finish:
            self.req.set_finish_time(time.perf_counter())

    # -- what the server is asked ----------------------------------------------------------
    def context(self, br: Branch) -> list[int]:
        """The tokens the server continues for ``br``: the prefix up to its fork + its own
        tokens (its path start included), the layout rule's sequence for that branch."""
        return br.seq_ids()

    def room(self, br: Branch) -> int:
        """An upper bound on the tokens ``br`` may still take (the engine refuses exactly)."""
        req, p = self.req, self.req.params
        depth = req.gen_start + p.max_tokens - br.state.next_pos
        total = p.total_budget - req.num_generated
        return max(1, min(depth, total))

    def seed_for(self, br: Branch) -> int:
        """The seed of ``br``'s next completion: the branch's seed (the engine's per-path
        derivation) for its first, then one derived from its length, so a continuation does not
        replay the same random stream."""
        k = self.requests_of.get(br, 0)
        self.requests_of[br] = k + 1
        return br.seed if k == 0 else branch_seed(br.seed, (f"@{len(br.own_ids)}",))

    # -- results ---------------------------------------------------------------------------
    def output(self, tokenizer: Any, prompt: str | None, start: float) -> RequestOutput:
        if not self.req.t_finish:
            self.req.set_finish_time(time.perf_counter())
        return build_output(tokenizer, self.req, prompt, start)

    def check_invariants(self) -> None:
        """The engine's invariants of this tree and its virtual pool (tests)."""
        self.kv.check_invariants()
        self.req.check_invariants(self.kv)
        if self.req.finished and self.kv.num_used:
            raise AssertionError(f"a finished request still holds {self.kv.num_used} virtual slots")
