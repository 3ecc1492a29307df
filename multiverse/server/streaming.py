"""Streaming a fork/join generation: the canonical text as a growing prefix, plus branch events.

:class:`BranchStreamer` reads a live :class:`~multiverse.engine.request.Request` between two
engine steps (read only) and says what is new since the last look:

* **text**: the part of the final canonical text (all branches merged in outline order, what
  ``RequestOutput.text`` will be) that is already certain. While a block's paths run, that is
  the text before the block, every path that has ended, in outline order, up to the first one
  that has not, and the live text of that first unfinished path (recursively, for nested
  blocks). The root's tokens, a child's tokens and the merge only ever append, so what was sent
  stays a prefix of the final text; held back: a trailing partial UTF-8 character, and the
  last ``hold`` characters when stop strings may still cut the text.
* **events** (the ``multiverse`` field of a chunk; docs/streaming.md):
  ``{"type": "fork", "block": 0, "branch": "", "labels": ["1", "2"], "paths": ["1", "2"]}``,
  ``{"type": "delta", "branch": "1.2", "block": 1, "text": "..."}``,
  ``{"type": "path_end", "branch": "1.2", "block": 1}``,
  ``{"type": "merge", "block": 0, "branch": ""}``.
  A branch is named by its path of outline labels from the root (``""`` is the root; a child
  labelled ``2`` of branch ``1`` is ``"1.2"``, and so is one labelled ``1.2``); blocks are
  numbered per request in the order they fork (a name recurs in a later block: ``(block,
  branch)`` is unique). A branch's deltas, concatenated, are exactly
  its path's text in the final output (``<Path>`` to ``</Path>`` and the newline after it).

The functions below build the OpenAI chunk objects and the SSE framing.
"""

from __future__ import annotations

import json
from typing import Any

from multiverse.engine.records import Status

_DONE = (Status.CLOSING, Status.ENDED, Status.FINISHED)


def branch_name(parent: str, label: str) -> str:
    """Name of the child labelled ``label`` of the branch named ``parent`` (see module doc)."""
    if not parent or label.startswith(parent + "."):
        return label
    return f"{parent}.{label}"


def stable_ids(root: Any, prompt_len: int) -> list[int]:
    """Token ids of the certain prefix of the canonical output (module docstring)."""
    out: list[int] = []

    def walk(b: Any, skip: int) -> bool:  # True: the branch and everything under it is complete
        out.extend(b.own_ids[skip:])
        if not b.children:
            return b.status in _DONE
        for c in list(b.children):
            if not walk(c, 0):
                return False
        return False  # every path ended, the merge has not happened yet

    walk(root, prompt_len)
    return out


class _Text:
    """Incremental decoding of a growing token list (partial characters held back)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = ""

    def advance(self, text: str, hold: int = 0, final: bool = False) -> str:
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: max(len(text) - hold, 0)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


class BranchStreamer:
    """What is new in one request since the last call (see the module docstring)."""

    def __init__(self, tokenizer: Any, hold: int = 0) -> None:
        self.tokenizer = tokenizer
        self.hold = hold
        self.text = _Text()
        self.branch_text: dict[Any, _Text] = {}  # Branch (by identity) -> text sent as deltas
        self.ended: set[Any] = set()
        self.forks: dict[Any, tuple[int, str, list[Any]]] = {}  # parent -> (block, name, children)
        self.child_block: dict[Any, int] = {}
        self.num_blocks = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def update(self, req: Any) -> tuple[str, list[dict[str, Any]]]:
        """(new canonical text, new events) of ``req`` now."""
        events: list[dict[str, Any]] = []
        self._walk(req.root, "", events)
        text = self._decode(stable_ids(req.root, req.prompt_len))
        return self.text.advance(text, self.hold), events

    def finish(self, req: Any, final_text: str) -> tuple[str, list[dict[str, Any]]]:
        """The rest, once ``req`` has finished with ``final_text`` (``RequestOutput.text``)."""
        events: list[dict[str, Any]] = []
        self._walk(req.root, "", events)
        for parent in list(self.forks):  # blocks folded at an abort / the KV capacity
            self._close(parent, events)
        return self.text.advance(final_text, final=True), events

    def _walk(self, b: Any, name: str, events: list[dict[str, Any]]) -> None:
        known = self.forks.get(b)
        kids = list(b.children)
        if known is not None and [id(c) for c in known[2]] != [id(c) for c in kids]:
            self._close(b, events)  # merged (children gone), maybe forked again since
            known = None
        if kids and known is None:
            block = self.num_blocks
            self.num_blocks += 1
            self.forks[b] = (block, name, kids)
            for c in kids:
                self.child_block[c] = block
            events.append({"type": "fork", "block": block, "branch": name, "labels": [c.label for c in kids],
                           "paths": [branch_name(name, c.label) for c in kids]})  # fmt: skip
        for c in kids:
            cname = branch_name(name, c.label)
            self._delta(c, cname, events)
            self._walk(c, cname, events)

    def _delta(self, c: Any, name: str, events: list[dict[str, Any]], final: bool = False) -> None:
        if c in self.ended:
            return
        sent = self.branch_text.setdefault(c, _Text())
        done = final or c.status in _DONE
        delta = sent.advance(self._decode(c.own_ids), final=done)
        if delta:
            events.append({"type": "delta", "branch": name, "block": self.child_block.get(c), "text": delta})
        if done:
            self.ended.add(c)
            events.append({"type": "path_end", "branch": name, "block": self.child_block.get(c)})

    def _close(self, parent: Any, events: list[dict[str, Any]]) -> None:
        block, name, kids = self.forks.pop(parent)
        for c in kids:
            cname = branch_name(name, c.label)
            if c in self.forks:
                self._close(c, events)
            self._delta(c, cname, events, final=True)
            self.branch_text.pop(c, None)
            self.ended.discard(c)
            self.child_block.pop(c, None)
        events.append({"type": "merge", "block": block, "branch": name})


# -- OpenAI chunk objects and SSE framing --------------------------------------------------
def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def completion_chunk(head: dict[str, Any], index: int, text: str, finish: str | None,
                     events: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    chunk = {**head, "object": "text_completion",
             "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip
    if events:
        chunk["multiverse"] = {"index": index, "events": events}
    return chunk


def chat_chunk(head: dict[str, Any], index: int, delta: dict[str, Any], finish: str | None,
               events: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    chunk = {**head, "object": "chat.completion.chunk",
             "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip
    if events:
        chunk["multiverse"] = {"index": index, "events": events}
    return chunk
