"""The Map / Reduce state machine of SPEC section 4: what happens after a branch's tokens are
computed or a token is sampled. Plain Python over :mod:`multiverse.engine.request` state and
the :class:`KVManager`; positions only from each branch's ``LayoutState``.

* Fork: a branch that samples ``</Goal>`` in phase goal gets ``\\n`` (forced, status FORKING);
  once both are computed, :meth:`ForkJoin.try_fork` reads the Outlines
  (:func:`multiverse.format.grammar.outline_labels`) and makes one child per Outline. Child ``i`` holds
  references to all of the parent's slots, attends what the parent's ``\\n`` attends plus itself,
  and starts with ``<Path>\\n{label}:`` (forced). A refused fork (limits, no Outline, a request
  that would no longer fit the KV pool)
  just lets the branch sample on.
* Path end: a child that samples ``</Path>`` outside any block of its own gets ``\\n``; EOS, a
  stop string (its text cut before the stop), the budget, or a tag that would break its
  parent's block (``<Path>``, ``<Conclusion>``, ``</Parallel>``, dropped) end it with
  ``</Path>\\n`` (first ``</Parallel>\\n`` per block it left open).
* Merge: when every child has ENDED and holds its K/V, the parent's K/V list becomes prefix +
  child 1 + child 2 + ... (outline order): references move, nothing is copied or recomputed. The
  parent's state is ``LayoutState.join``-ed and ``<Conclusion>\\n`` (forced) follows.
* Budgets are checked before a sampled token is taken, leaving room for the closing tokens
  every open fork still needs, so ``max_tokens`` (depth) and the total bound
  (``SamplingParams.total_budget``: ``max_total_tokens``, by default 4 x ``max_tokens``) always
  hold: every request ends. The root ends with ``"length"`` or ``"max_total_tokens"``.
* Structure that cannot make progress ends the request with ``"malformed"``: ``<Parallel>``
  right after ``<Parallel>``, an empty path restarted by ``<Path>`` in a sequential block.
  ``<Path>`` at the root or after a block's Conclusion is an ordinary token (the layout rule).
* Stop strings (:mod:`.stops`): a stop the model writes in a forked path ends that path (its
  text cut before the stop, closed with ``</Path>\\n``); in the root it ends the request. Only
  sampled text matches (``decode``: the tokenizer's, whether or not it has the tags).

Branch state changes only through :mod:`.request` methods (``fork``, ``merge_children``,
``fold_children``, the status transitions...); this module makes the matching KVManager calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multiverse.engine import stops
from multiverse.engine.kv_manager import KVManager
from multiverse.engine.request import Branch, Request, Status
from multiverse.engine.sampling import branch_seed
from multiverse.format import grammar

_BREAKING = ("<Path>", "<Conclusion>", "</Parallel>")  # end a child when at its base depth
_LIVE = (Status.RUNNING, Status.FORKING)


@dataclass(slots=True)
class Specials:
    """Token ids the engine inserts, read from the tokenizer."""

    tag_ids: dict[str, int]
    newline: list[int]
    close_path: list[int]  # "</Path>\n"
    close_block: list[int]  # "</Parallel>\n"
    conclusion: list[int]  # "<Conclusion>\n"
    eos: int | None
    tokenizer: Any

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, tag_ids: dict[str, int]) -> Specials:
        def enc(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        nl = enc("\n")
        return cls(tag_ids, nl, [tag_ids["</Path>"], *nl], [tag_ids["</Parallel>"], *nl],
                   [tag_ids["<Conclusion>"], *nl], tokenizer.eos_token_id, tokenizer)  # fmt: skip

    def path_start(self, label: str) -> list[int]:
        return [self.tag_ids["<Path>"], *self.tokenizer.encode(f"\n{label}:", add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class ForkJoin:
    """Transitions of every branch of every request (see the module docstring)."""

    def __init__(self, kv: KVManager, decode: Callable[[list[int]], str], specials: Specials | None = None, *,
                 on_release: Callable[[Branch], None] = lambda b: None,
                 on_finish: Callable[[Request], None] = lambda r: None,
                 eos_ids: frozenset[int] = frozenset()) -> None:  # fmt: skip
        self.kv = kv
        self.decode = decode  # token ids -> text, special tokens kept (stop strings)
        self.sp = specials  # None: a tokenizer without the tags; nothing forks
        self.on_release = on_release
        self.on_finish = on_finish  # a request just finished; its root still holds its K/V
        self.eos_ids = eos_ids  # the tokenizer's EOS and the checkpoint's generation_config EOS ids

    # -- appending -------------------------------------------------------------------------
    def _insert(self, br: Branch, tokens: list[int], mark: bool = True) -> None:
        for t in tokens:
            br.append_generated(t, forced=True, mark=mark)

    def forced_token(self, br: Branch) -> int | None:
        """Test hook: the token ``forced_output`` makes this branch write (-1 = its part ended)."""
        ids = br.request.forced_ids
        if ids is None:
            return None
        return ids[br.cursor] if br.cursor < br.cursor_end else -1

    # -- budgets ---------------------------------------------------------------------------
    def _closing_cost(self, br: Branch, depth: int) -> int:
        """Positions still needed after ``br``'s next token to close every fork around it."""
        sp, cost, x, d = self.sp, 0, br, depth
        while x.parent is not None and sp is not None:
            cost += len(sp.close_block) * max(0, d - x.base_depth) + len(sp.close_path) + len(sp.conclusion)
            x = x.parent
            d = x.state.depth
        return cost

    def _total_reserve(self, req: Request) -> int:
        """Tokens all branches of ``req`` still need to close their open forks."""
        sp, need = self.sp, 0
        if sp is None:
            return 0
        for b in req.branches():
            if b.status is Status.WAITING:
                need += len(sp.conclusion)
            if b.parent is not None and b.status in (*_LIVE, Status.WAITING):
                need += len(sp.close_block) * max(0, b.state.depth - b.base_depth) + len(sp.close_path)
        return need

    def _refusal(self, br: Branch, token: int, tag: str | None, extra: int) -> str | None:
        """Why ``br`` may not take this sampled token (followed by ``extra`` forced tokens):
        ``"length"`` (the depth bound), ``"max_total_tokens"``, or None: it may."""
        req, p = br.request, br.request.params
        if tag is None:
            pos, depth = br.state.next_pos, br.state.depth
        else:
            st = br.state.clone()
            pos = st.step(tag)
            depth = st.depth
        limit = req.gen_start + p.max_tokens  # positions must stay below this
        top = pos if br.parent is None else max(pos, br.max_pos)
        if top + 1 + extra + self._closing_cost(br, depth) > limit:
            return "length"
        grow = len(self.sp.close_block) if (self.sp and tag == "<Parallel>" and br.parent) else 0
        if req.num_generated + 1 + extra + grow + self._total_reserve(req) > p.total_budget:
            return "max_total_tokens"
        return None

    def _stalls(self, br: Branch, tag: str | None) -> bool:
        """Structure that cannot make progress (``malformed``): ``<Parallel>`` right after
        ``<Parallel>``, or a ``<Path>`` that restarts a sequential block's positions right after
        an empty path (``<Path>`` [whitespace, ``</Path>``] ``<Path>``): the depth would never grow."""
        if tag == "<Path>" and br.state.phase != "paths":
            return False
        if tag not in ("<Path>", "<Parallel>"):
            return False
        first = br.request.prompt_len if br.parent is None else 0
        names = br.request.tag_names
        for i in range(len(br.own_ids) - 1, max(first, len(br.own_ids) - 16) - 1, -1):
            t = br.own_ids[i]
            name = names.get(t)
            if name == tag:
                return True
            if name == "</Path>" and tag == "<Path>":
                continue
            if name is not None or self.decode([t]).strip():
                return False
        return False

    # -- transitions -----------------------------------------------------------------------
    def on_computed(self, br: Branch) -> bool:
        """``br``'s pending tokens are all computed; returns True when it must sample now."""
        if br.status is Status.FORKING:
            if self.try_fork(br):
                return False
            br.fork_refused()
        if br.status is Status.RUNNING:
            return True
        if br.status is Status.CLOSING:
            br.end_path()
        if br.status is Status.ENDED and br.parent is not None:
            self.try_merge(br.parent)
        elif br.status is Status.WAITING:  # recomputed after preemption
            self.try_merge(br)
        return False

    def on_sampled(self, br: Branch, token: int, logprob: float | None) -> None:
        """Take (or refuse) the token ``br`` sampled; -1 = the forced output ended (EOS)."""
        req, p = br.request, br.request.params
        if token < 0 or token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            self.end_branch(br, "stop", ended_by=(token, logprob) if token >= 0 else None)
            return
        tag = req.tag_names.get(token)
        child = br.parent is not None
        at_base = child and br.state.depth == br.base_depth
        if at_base and tag in _BREAKING:
            self.end_branch(br, "stop")
            return
        if tag is not None and p.stop and self._cut_stop(br, tag):  # the tag is not written
            self._stopped(br)
            return
        if self._stalls(br, tag):
            self.finish(req, "malformed", ended_by=(token, logprob))
            return
        opens_fork = req.parallel and tag == "</Goal>" and br.state.phase == "goal"
        ends_path = at_base and tag == "</Path>"
        extra = len(self.sp.newline) if (self.sp and (opens_fork or ends_path)) else 0
        refusal = self._refusal(br, token, tag, extra)
        if refusal is not None:
            self.end_branch(br, refusal)
            return
        br.append_generated(token, forced=False, logprob=logprob)
        if opens_fork or ends_path:
            self._insert(br, self.sp.newline)
            if opens_fork:
                br.start_fork()
            else:
                br.start_closing()
        elif p.stop and tag is None and self._cut_stop(br):
            self._stopped(br)

    def _cut_stop(self, br: Branch, tag: str | None = None) -> bool:
        """Did ``br``'s last sampled token (or the ``tag`` it is about to write) complete a stop
        string? Then cut it (:mod:`.stops`)."""
        req = br.request
        first = req.prompt_len if br.parent is None else 0
        cut = stops.find_cut(self.decode, br.own_ids, br.own_forced, req.tag_names, first, req.params.stop, tag)
        if cut is not None:
            br.cut_at_stop(*cut)
        return cut is not None

    def _stopped(self, br: Branch) -> None:
        """A stop string: a path ends (the request goes on to the merge); the root ends the request."""
        if br.parent is not None:
            self.end_branch(br, "stop")
        else:
            self.finish(br.request, "stop", cut_stop=True)

    def end_branch(self, br: Branch, reason: str, ended_by: tuple[int, float | None] | None = None) -> None:
        """EOS / stop / budget: a child is closed (``</Parallel>\\n`` per block it left open,
        then ``</Path>\\n``); the root finishes the request (``ended_by``: the sampled token
        that ended it, left out of the output: :attr:`Request.ended_by`)."""
        if br.parent is None:
            self.finish(br.request, reason, ended_by=ended_by)
            return
        for _ in range(br.state.depth - br.base_depth):
            self._insert(br, self.sp.close_block)
        self._insert(br, self.sp.close_path)
        br.start_closing()

    # -- Map -------------------------------------------------------------------------------
    def try_fork(self, br: Branch) -> bool:
        req, p, sp = br.request, br.request.params, self.sp
        if sp is None or not br.open_at or br.state.phase != "goal":
            return False
        goal_start = br.open_at[-1] - br.prefix_len
        labels = grammar.outline_labels(sp.decode(br.own_ids[max(goal_start, 0) :]))
        k = len(labels)
        live = sum(1 for b in req.branches() if b.status in (*_LIVE, Status.CLOSING))
        if k == 0 or k > p.max_paths or br.level + 1 > p.max_depth or live - 1 + k > p.max_live_branches:
            return False
        starts = [sp.path_start(lab) for lab in labels]
        inserted = sum(len(s) for s in starts)
        # depth: every child must fit its start, one token and its closing
        s = br.state.next_pos
        child_close = len(sp.close_path) + len(sp.conclusion) + self._closing_cost(br, br.state.depth)
        if s + max(len(x) for x in starts) + 1 + child_close > req.gen_start + p.max_tokens:
            return False
        need = inserted + k * (1 + len(sp.close_path)) + len(sp.conclusion)
        if req.num_generated + need + self._total_reserve(req) > p.total_budget:
            return False
        # memory: refused only when the whole request could no longer fit the pool; transient
        # pressure is the scheduler's (preemption), so results do not depend on the batch
        if req.prompt_len + req.num_generated + inserted + k + len(sp.conclusion) > self.kv.num_slots:
            return False
        self._fork(br, labels, starts)
        return True

    def _fork(self, br: Branch, labels: list[str], starts: list[list[int]]) -> None:
        ranges, resume = self._forced_ranges(br, len(labels))
        path, root_seed = br.path_label(), br.request.root.seed
        seeds = [branch_seed(root_seed, (*path, label)) for label in labels]
        children = br.fork(labels, br.state.fork(len(labels)), seeds, ranges, resume)
        for child, start in zip(children, starts, strict=True):
            self.kv.share(child, br.kv)
            self._insert(child, start, mark=False)  # visibility set by the fork: prefix + itself

    def _forced_ranges(self, br: Branch, k: int) -> tuple[list[tuple[int, int]], int]:
        """Test hook: the part of ``forced_output`` each child writes (from the layout of the
        prompt + forced text) and where the parent resumes after the merge."""
        req, lay = br.request, br.request.forced_layout
        if req.forced_ids is None or lay is None:
            return [(-1, -1)] * k, -1
        n, g = len(req.forced_ids), req.prompt_len + br.cursor
        end = [(n, n)] * k
        if br.cursor >= n or req.tag_names.get(req.forced_ids[br.cursor]) != "<Path>":
            return end, br.cursor
        levels = [lvl for lvl in range(lay.num_levels) if int(lay.block_ids[lvl, g]) >= 0]
        if not levels:
            return end, br.cursor
        level = levels[-1]
        block = int(lay.block_ids[level, g])
        idx = (lay.block_ids[level] == block).nonzero()[:, 0].tolist()
        paths = lay.path_ids[level, idx].tolist()
        spans: dict[int, list[int]] = {}
        for i, pid in zip(idx, paths, strict=True):
            spans.setdefault(pid, [i, i])[1] = i
        ordered = [spans[pid] for pid in sorted(spans)]
        off = req.prompt_len
        ranges = [(a - off, b + 1 - off) for a, b in ordered] + end
        return ranges[:k], idx[-1] + 1 - off

    # -- Reduce ----------------------------------------------------------------------------
    def try_merge(self, parent: Branch) -> None:
        kids = parent.children
        if parent.status is not Status.WAITING or not parent.resident or parent.num_pending:
            return
        if any(c.status is not Status.ENDED or c.num_pending or not c.resident for c in kids):
            return
        self.kv.share(parent, parent.children_slots())
        for c in parent.merge_children():
            self._release(c)
        self._insert(parent, self.sp.conclusion, mark=False)  # sees prefix + every path

    # -- end of a request ------------------------------------------------------------------
    def finish(self, req: Request, reason: str, cut_stop: bool = False, error: str | None = None,
               ended_by: tuple[int, float | None] | None = None) -> None:  # fmt: skip
        """Finish ``req``: fold any unmerged children into the output (a request cut short by
        the KV capacity) and release every slot its branches hold."""
        if req.finished:
            return
        for b in req.root.fold_children():
            self._release(b)
        req.finish(reason, cut_stop, error, ended_by)  # cut_stop: the output builder cuts at the stop string
        self.on_finish(req)  # e.g. the prefix cache takes the root's K/V (LLM._cache_finished)
        self._release(req.root)

    def _release(self, br: Branch) -> None:
        self.kv.release_if_held(br)
        br.release_kv()
        self.on_release(br)
