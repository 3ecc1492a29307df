"""Stop strings (``SamplingParams.stop``): the one home of their semantics, read by the engine
(:mod:`.forkjoin`), the output builder (:mod:`.outputs`) and the streamer
(:mod:`multiverse.server.streaming`).

* A stop string matches only text the model wrote: never the prompt, never a token the engine
  inserted (``<Path>\\n1:``, ``</Path>\\n``, ``<Conclusion>\\n``, ``\\n`` after ``</Goal>``...).
  A Multiverse tag the model writes (a parallel request) can end a match but not sit inside
  one: a match lies in one *run* (the sampled non-tag tokens of one branch since its last
  engine-inserted token or tag, :func:`run_start`, across token boundaries), optionally
  followed by the tag the model writes next. A stop completed by a tag ends the branch before
  the tag, which is not written (a tag is never cut in half), so ``stop=["</Think>"]`` ends
  where the model closes its thinking and the structure left stays well formed.
* Where several stops match (overlapping stops), the first one completed wins, on a tie the
  one that starts first (:func:`earliest_stop`): the text is cut at its start.
* In a forked path, a stop ends THAT path: its text is cut before the stop and the engine closes
  it with ``</Path>\\n`` (as it does at EOS or a budget); the other paths and the request go on
  to the merge and the Conclusion. In the root (the shared prefix, the Conclusion, or a block
  the engine did not fork) a stop ends the request, its text cut before the stop.
* The cut is a :class:`~multiverse.engine.request.Branch` *cut* ``(start, end, text)``: the text
  of ``own_ids[start:end]`` (the run, up to the token that completed the stop) is ``text``.
  The token ids keep every token; :func:`render` applies the cuts to give the text.
* Streaming holds back the end of the live run that could still begin a stop
  (:func:`stop_hold`), so what was sent stays a prefix of the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Cut = tuple[int, int, str]  # own_ids[start:end] reads as text


def run_start(own_ids: Sequence[int], own_forced: Sequence[bool], tag_names: dict[int, str], first: int,
              limit: int | None = None) -> int:  # fmt: skip
    """Index of the first token of the run that ends ``own_ids`` (after the last engine-inserted
    token or tag, never before ``first``); ``limit``: look back at most that many tokens."""
    lo = first if limit is None else max(first, len(own_ids) - limit)
    i = len(own_ids)
    while i > lo and not own_forced[i - 1] and own_ids[i - 1] not in tag_names:
        i -= 1
    return i


def earliest_stop(text: str, stops: Sequence[str]) -> int:
    """Where the stop that wins in ``text`` starts (-1: none): the first one completed (the
    earliest end), on a tie the earliest start (the longer one). Checked after every token, a
    run holds at most the matches its last token completed, so this does not depend on how the
    text was split into tokens."""
    found = [(k + len(s), k) for s in stops if (k := text.find(s)) >= 0]
    return min(found)[1] if found else -1


def stop_hold(text: str, stops: Sequence[str], limit: int | None = None) -> int:
    """How many trailing characters of a live branch's ``text`` could still begin a stop string:
    the longest suffix (at most ``limit`` characters: the live run's length) that is a proper
    prefix of one of ``stops``. Once a position cannot begin a stop it never can again, so the
    text before the hold only grows."""
    hold, cap = 0, len(text) if limit is None else min(limit, len(text))
    for s in stops:
        for j in range(min(len(s) - 1, cap), hold, -1):
            if text.endswith(s[:j]):
                hold = j
                break
    return hold


def find_cut(decode: Callable[[list[int]], str], own_ids: Sequence[int], own_forced: Sequence[bool],
             tag_names: dict[int, str], first: int, stops: Sequence[str], tag: str | None = None) -> Cut | None:  # fmt: skip
    """The cut for a stop string completed by the last token of ``own_ids`` (None: no stop), or,
    with ``tag``, by the Multiverse tag the branch is about to write (the tag is then not
    written: the cut is at the tag's start at the latest, so a tag is never cut in half).

    Called after every sampled token, so only the tail is decoded: a window of tokens long enough
    for the longest stop (4 bytes a character at worst) and the last token."""
    window = 4 * max(len(s) for s in stops) + 8
    start = run_start(own_ids, own_forced, tag_names, first, window)
    tail = decode(list(own_ids[start:])) + (tag or "")
    if not any(s in tail for s in stops):
        return None
    start = run_start(own_ids, own_forced, tag_names, first)
    run = decode(list(own_ids[start:]))
    k = earliest_stop(run + (tag or ""), stops)
    return None if k < 0 else (start, len(own_ids), run[: min(k, len(run))])


def render(decode: Callable[[list[int]], str], ids: Sequence[int], cuts: Sequence[Cut], start: int = 0,
           end: int | None = None) -> str:  # fmt: skip
    """The text of ``ids[start:end]`` with each cut inside it applied (the reference decode)."""
    end = len(ids) if end is None else end
    out, pos = [], start
    for a, b, text in sorted(cuts):
        if a < start or b > end:
            continue
        out.append(decode(list(ids[pos:a])))
        out.append(text)
        pos = b
    out.append(decode(list(ids[pos:end])))
    return "".join(out)


def output_text(tokenizer: Any, own_ids: Sequence[int], cuts: Sequence[Cut], start: int) -> str:
    """A branch's text from ``start`` (the canonical output text of a root from the prompt's end)."""
    return render(
        lambda ids: tokenizer.decode(ids, skip_special_tokens=False), own_ids, cuts, start
    )
