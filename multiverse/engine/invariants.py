"""Consistency checks of a request's branch tree against the KV pool's bookkeeping. Read only.

For every branch of an unfinished request:
  * an *attached* branch has ``len(kv) == prefix_len + num_computed``; a detached one (a child
    preempted, waiting to take its prefix back) has no K/V and nothing computed;
  * an attached child's ``kv[:prefix_len]`` is its parent's ``kv[:prefix_len]`` (the same slots);
  * ``attend`` is a subsequence of ``kv``;
  * the :class:`~multiverse.engine.kv_manager.KVManager` holds exactly the slots of ``kv`` for
    the branch, and each slot's reference count covers every branch that lists it;
  * a branch has children exactly while it is WAITING, each with ``prefix_len`` = its ``seq_len``
    and a label of its own (SPEC 4: labels are unique within a block);
    only a child closes or ends a path, only a root finishes.
A finished request's root is FINISHED, has no children and holds no slot.

Each check raises ``AssertionError`` naming the branch and the broken invariant; the cost is
linear in the K/V lists (tests run it after every engine step).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from multiverse.engine.records import Status

if TYPE_CHECKING:
    from multiverse.engine.kv_manager import KVManager
    from multiverse.engine.request import Branch, Request


def check_request(req: Request, kv: KVManager) -> None:
    root = req.root
    if req.finished:
        if root.status is not Status.FINISHED or root.children or root.kv or kv.held(root):
            raise AssertionError(f"finished request {req.id} still holds branches or K/V slots")
        return
    counts: Counter[int] = Counter()
    for b in req.branches():
        if b.request is not req:
            raise AssertionError(f"{b} is in the tree of request {req.id}")
        check_branch(b, kv)
        counts.update(b.kv)
    kv.check_counts(counts)


def check_branch(b: Branch, kv: KVManager) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise AssertionError(f"{b}: {what}")

    n = len(b.own_ids)
    need(len(b.own_pos) == len(b.own_forced) == len(b.own_logprobs) == n,
         "own_ids / own_pos / own_forced / own_logprobs differ in length")  # fmt: skip
    need(0 <= b.num_computed <= n, f"num_computed {b.num_computed} of {n} tokens")
    parent = b.parent
    if b.attached:
        need(len(b.kv) == b.prefix_len + b.num_computed,
             f"len(kv) {len(b.kv)} != prefix_len {b.prefix_len} + num_computed {b.num_computed}")  # fmt: skip
        if parent is not None:
            need(parent.kv[: b.prefix_len] == b.kv[: b.prefix_len], "kv[:prefix_len] differs from the parent's")
    else:
        need(parent is not None, "a detached root")
        need(not b.kv and not b.attend and b.num_computed == 0, "detached, but holds K/V")
    it = iter(b.kv)
    need(b.attend == b.kv or all(s in it for s in b.attend), "attend is not a subsequence of kv")
    need(len(set(b.kv)) == len(b.kv), "kv lists a slot twice")
    kv.check_holder(b, b.kv)
    need(bool(b.children) == (b.status is Status.WAITING), f"{len(b.children)} children in status {b.status.value}")
    for c in b.children:
        need(c.parent is b and c.prefix_len == b.seq_len,
             f"child {c} has prefix_len {c.prefix_len}, seq_len is {b.seq_len}")  # fmt: skip
    need(len({c.label for c in b.children}) == len(b.children), "two children share a label")
    if parent is None:
        need(b.status not in (Status.CLOSING, Status.ENDED), "the root is closing a path")
    else:
        need(b.status is not Status.FINISHED, "a path is FINISHED")
