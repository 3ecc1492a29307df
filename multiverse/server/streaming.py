"""Streaming a fork/join generation: the canonical text as a growing prefix, plus branch events.

:class:`BranchStreamer` reads a live :class:`~multiverse.engine.request.Request` between two
engine steps (read only) and says what is new since the last look:

* **text**: the part of the final canonical text (all branches merged in outline order, what
  ``RequestOutput.text`` will be) that is already certain. While a block's paths run, that is
  the text before the block, every path that has ended, in outline order, up to the first one
  that has not, and the live text of that first unfinished path (recursively, for nested
  blocks). The root's tokens, a child's tokens and the merge only ever append, so what was sent
  stays a prefix of the final text; held back: a trailing partial UTF-8 character, and the end
  of a live branch's run that could still begin a stop string (:mod:`multiverse.engine.stops`:
  a stop cuts that path, or in the root the request, right there). Each branch's text is
  decoded incrementally (:mod:`.detokenize`), so a step costs the same at any length.
* **events** (the ``multiverse`` field of a chunk; docs/streaming.md):
  ``{"type": "fork", "block": 0, "branch": "", "labels": ["1", "2"], "paths": ["1", "2"]}``,
  ``{"type": "delta", "branch": "1/1.2", "block": 1, "text": "..."}``,
  ``{"type": "path_end", "branch": "1/1.2", "block": 1}``,
  ``{"type": "merge", "block": 0, "branch": ""}``.
  A branch is named by its outline labels from the root joined with ``/`` (:func:`branch_name`:
  ``""`` is the root, its child labelled ``2`` is ``"2"``, the children labelled ``2`` and
  ``1.2`` of branch ``"1"`` are ``"1/2"`` and ``"1/1.2"``); blocks are numbered per request in
  the order they fork (a name recurs in a later block: ``(block, branch)`` is unique). A
  branch's deltas, concatenated, are exactly
  its path's text in the final output (``<Path>`` to ``</Path>`` and the newline after it).

The functions below build the OpenAI chunk objects and the SSE framing: one chunk per choice
update (:func:`choice_chunk`, the last one with the finish reason and the ``multiverse`` fields
of the end), the usage chunk. Both servers stream with them: the local one from its engine, the
one in front of a fleet (``serve --base-url``) from the fork/join driver's live trees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from multiverse.engine import stops
from multiverse.engine.records import Status
from multiverse.server import responses
from multiverse.server.detokenize import FullText, IncrementalText

log = logging.getLogger("multiverse.server")
_DONE = (Status.CLOSING, Status.ENDED, Status.FINISHED)


def branch_name(parent: str, label: str) -> str:
    """Name of the child labelled ``label`` of the branch named ``parent``: the labels from the
    root joined with ``/``. A label is digits and dots, unique among its siblings (SPEC 4), so
    a name is unique and splits back into its labels. (Joined with ``.``, the children ``2`` and
    ``1.2`` of branch ``1`` were both ``1.2``, as was the root's child ``1.2``.)"""
    return f"{parent}/{label}" if parent else label


class _State:
    """What the streamer knows of one branch: its text and how much of it went where."""

    __slots__ = ("text", "released", "sent", "canon", "ended", "ids")

    def __init__(self, text: IncrementalText | FullText, ids: int) -> None:
        self.text = text
        self.ids = ids  # tokens of its eventual own_ids sent as canonical ids (the root: from the prompt's end)
        self.released = 0  # characters certain (held back: a partial character, a possible stop)
        self.sent = 0  # ... sent as delta events
        self.canon = 0  # ... sent as the canonical text
        self.ended = False


class BranchStreamer:
    """What is new in one request since the last call (see the module docstring).

    ``incremental=False``: every branch's text is re-decoded in full after every step (the
    reference: the same chunks, at a cost growing with the length). ``token_ids``: also say the
    canonical token ids new in each call (:attr:`ids`; ``return_token_ids``), a few % more work."""

    def __init__(self, tokenizer: Any, incremental: bool = True, token_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.incremental = incremental
        self.token_ids = token_ids
        self.states: dict[Any, _State] = {}  # Branch (by identity) -> its text so far
        self.forks: dict[Any, tuple[int, str, list[Any], int]] = {}  # parent -> (block, name, children, start)
        self.merged: dict[tuple[Any, int], tuple[str, bool]] = {}  # (parent, start) -> (text, sent as canonical)
        self.child_block: dict[Any, int] = {}
        self.num_blocks = 0
        self.sent = 0  # characters of canonical text sent
        self.ids: list[int] = []  # the canonical token ids new in the last update / finish
        self.ids_sent = 0  # ... sent in all

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def update(self, req: Any) -> tuple[str, list[dict[str, Any]]]:
        """(new canonical text, new events) of ``req`` now."""
        events: list[dict[str, Any]] = []
        out: list[str] = []
        self.ids = []
        self._walk(req, req.root, "", events, out, True)
        text = "".join(out)
        self.sent += len(text)
        self.ids_sent += len(self.ids)
        return text, events

    def finish(
        self, req: Any, final_text: str, final_ids: list[int] | None = None
    ) -> tuple[str, list[dict[str, Any]]]:
        """The rest, once ``req`` has finished with ``final_text`` (``RequestOutput.text``);
        :attr:`ids`: the rest of ``final_ids`` (the response's ``token_ids``, the stop token kept)."""
        events: list[dict[str, Any]] = []
        out: list[str] = []
        self.ids = []
        self._walk(req, req.root, "", events, out, True)
        for parent in list(self.forks):  # blocks folded at an abort / the KV capacity
            self._close(req, parent, events, out, False)
        rest = "".join(out)
        sent, self.sent = self.sent, len(final_text)
        if sent + len(rest) != len(final_text):  # a bug: the final text is what counts
            log.warning("request %s: streamed %d + %d characters, the output has %d", req.id, sent, len(rest),
                        len(final_text))  # fmt: skip
        if final_ids is not None:  # the stop token that ended it comes last
            if self.ids_sent + len(self.ids) > len(final_ids):  # a bug, as above
                log.warning("request %s: streamed %d + %d token ids, the output has %d", req.id, self.ids_sent,
                            len(self.ids), len(final_ids))  # fmt: skip
            self.ids = list(final_ids[self.ids_sent :])
        self.ids_sent += len(self.ids)
        return final_text[sent:], events

    def _state(self, req: Any, b: Any) -> _State:
        st = self.states.get(b)
        if st is None:
            first = req.prompt_len if b.parent is None else 0
            text = IncrementalText(first) if self.incremental else FullText(first)
            st = self.states[b] = _State(text, first)
        return st

    def _send_ids(self, b: Any, st: _State) -> None:
        """``b``'s new tokens, everything before them sent: canonical ids. They will sit in each
        ancestor's ``own_ids`` once merged, right after what it has sent, so each counts them."""
        if not self.token_ids:
            return
        known = self.forks.get(b)  # a block the streamer has not closed: its paths send their own
        n = (known[3] if known is not None else len(b.own_ids)) - st.ids
        if n <= 0:
            return
        self.ids += b.own_ids[st.ids : st.ids + n]
        st.ids += n
        a = b.parent
        while a is not None:
            self.states[a].ids += n
            a = a.parent

    def _block_text(self, b: Any, blk: Any) -> str:
        """A merged block's text: its children's, or decoded here if the streamer never saw them."""
        known = self.merged.get((b, blk.start))
        return known[0] if known is not None else stops.render(self._decode, b.own_ids, b.cuts, blk.start, blk.end)

    def _advance(self, req: Any, b: Any, final: bool) -> _State:
        """Read ``b``'s new tokens; ``released``: its text up to what a stop could still cut."""
        st = self._state(req, b)
        for start, length in st.text.advance(b, self._decode, req.tag_names, final, self._block_text):
            known = self.merged.pop((b, start), None)
            if known is not None and known[1]:  # its children's text went out as canonical text
                st.canon += length
        n = st.text.length()
        stop = req.params.stop
        if stop and not final:
            n -= stops.stop_hold(st.text.tail(max(map(len, stop))), stop, st.text.run_len())
        st.released = max(st.released, n)
        return st

    def _emit(self, b: Any, st: _State, out: list[str], canonical: bool, name: str = "",
              events: list[dict[str, Any]] | None = None, done: bool = False) -> None:  # fmt: skip
        """Send ``b``'s released text (``st``): as canonical text and ids (``canonical``: everything
        before it has been sent) and, for a path (a child branch; ``events`` given), as delta /
        path_end events."""
        if canonical and st.released > st.canon:
            out.append(st.text.piece(st.canon, st.released))
            st.canon = st.released
        if canonical:
            self._send_ids(b, st)
        if b.parent is None or events is None or st.ended:
            return
        block = self.child_block.get(b)
        if st.released > st.sent:
            events.append({"type": "delta", "branch": name, "block": block, "text": st.text.piece(st.sent, st.released)})
            st.sent = st.released
        if done:
            st.ended = True
            events.append({"type": "path_end", "branch": name, "block": block})

    def _walk(self, req: Any, b: Any, name: str, events: list[dict[str, Any]], out: list[str],
              frontier: bool) -> bool:  # fmt: skip
        """Events and canonical text (``frontier``: everything before ``b`` has been sent) of ``b``
        and its subtree; True when ``b`` is a path whose text is complete."""
        known = self.forks.get(b)
        kids = list(b.children)
        if known is not None and [id(c) for c in known[2]] != [id(c) for c in kids]:
            self._emit(b, self._state(req, b), out, frontier)  # its text before the block, if not sent yet
            self._close(req, b, events, out, frontier)  # merged (children gone), maybe forked again since
            known = None
        done = b.status in _DONE
        st = self._advance(req, b, done)
        self._emit(b, st, out, frontier, name, events, done)
        if kids and known is None:
            block = self.num_blocks
            self.num_blocks += 1
            self.forks[b] = (block, name, kids, len(b.own_ids))
            for c in kids:
                self.child_block[c] = block
            events.append({"type": "fork", "block": block, "branch": name, "labels": [c.label for c in kids],
                           "paths": [branch_name(name, c.label) for c in kids]})  # fmt: skip
        for c in kids:
            frontier = self._walk(req, c, branch_name(name, c.label), events, out, frontier) and frontier
        return b.parent is not None and done

    def _close(self, req: Any, parent: Any, events: list[dict[str, Any]], out: list[str], frontier: bool) -> None:
        """``parent``'s block was merged or folded: every path's text is final."""
        block, name, kids, start = self.forks.pop(parent)
        texts = []
        for c in kids:
            cname = branch_name(name, c.label)
            if c in self.forks:
                self._emit(c, self._state(req, c), out, frontier)  # its text before its own block
                self._close(req, c, events, out, frontier)
            st = self._advance(req, c, True)
            self._emit(c, st, out, frontier, cname, events, True)
            texts.append(st.text.piece(0))
            self.states.pop(c, None)
            self.child_block.pop(c, None)
        self.merged[(parent, start)] = ("".join(texts), frontier)
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


def choice_chunk(head: dict[str, Any], index: int, chat: bool, text: str, events: list[dict[str, Any]] | None = None,
                 ids: list[int] | None = None, out: Any = None, prompt_ids: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """The chunk of choice ``index`` carrying ``text`` (new canonical text) and ``events``; with
    ``out`` (its finished :class:`~multiverse.engine.outputs.RequestOutput`) the last one: the
    OpenAI finish reason, and in ``multiverse`` the engine's own (``malformed`` ...), the seed
    that replays it, ``forking`` and, from the driver, the ``merge`` mode. Completions with
    ``return_token_ids`` (vLLM's streamed form): ``ids``, the chunk's new token ids, as
    ``token_ids``, with ``stop_reason`` (set on the last chunk when a stop id ended it) and, on a
    choice's first chunk, ``prompt_token_ids``."""
    finish = None if out is None else responses.finish_reason(out)
    if chat:
        chunk = chat_chunk(head, index, {"content": text} if text else {}, finish, events)
    else:
        chunk = completion_chunk(head, index, text, finish, events)
        if ids is not None:
            choice = chunk["choices"][0]
            choice["token_ids"] = list(ids)
            choice["stop_reason"] = None if out is None else responses.token_ids(out)["stop_reason"]
            if prompt_ids is not None:
                choice["prompt_token_ids"] = list(prompt_ids)
    if out is not None:
        end = {"finish_reason": out.finish_reason, "seed": out.seed, "forking": out.forking}
        if getattr(out, "merge", None):
            end["merge"] = out.merge
        chunk.setdefault("multiverse", {"index": index}).update(end)
    return chunk


class ChoiceChunks:
    """Both servers' SSE chunks of a request's choices (:func:`choice_chunk`): with ``with_ids``
    (``return_token_ids``) each carries its new token ids, and a choice's first one the prompt's,
    ``prompt_ids(index, out)`` (called on that first chunk only)."""

    def __init__(self, head: dict[str, Any], chat: bool, with_ids: bool, n: int,
                 prompt_ids: Callable[[int, Any], list[int]]) -> None:  # fmt: skip
        self.head, self.chat, self.with_ids, self.prompt_ids = head, chat, with_ids, prompt_ids
        self._first = [True] * n

    def __call__(self, index: int, text: str, events: list[Any], ids: list[int], out: Any = None) -> str:
        first, self._first[index] = self._first[index], False
        if not self.with_ids:
            return sse(choice_chunk(self.head, index, self.chat, text, events, None, out))
        prompt = self.prompt_ids(index, out) if first else None
        return sse(choice_chunk(self.head, index, self.chat, text, events, ids, out, prompt))


def usage_chunk(head: dict[str, Any], chat: bool, outs: list[Any]) -> dict[str, Any]:
    """The last chunk of ``stream_options.include_usage``: no choices, the usage of all."""
    return {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
            "usage": responses.usage(outs)}  # fmt: skip
