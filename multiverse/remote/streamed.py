"""A branch fed from a streamed completion, token by token (the driver's streaming path).

:func:`feed_stream` reads :meth:`~multiverse.remote.transport.Replica.stream`'s pieces and gives
each one's token ids to the branch as they arrive (:meth:`~multiverse.remote.tree.Tree.feed`, the
engine's rules per token), reporting progress after each piece, so a client of ``multiverse serve
--base-url`` sees text and branch events per token. It closes the stream as soon as the branch
stops taking what the server sends (the engine's rules inserted a token, ended the branch or
finished the request): the server sees the disconnect and frees the work.

A stream that breaks after tokens arrived (:class:`~multiverse.remote.transport.StreamCut`) keeps
what the branch took: the driver continues from there, asking again with the prompt + the tokens
received (the branch's new context), as it continues a completion that ended at its
``max_tokens``. Under greedy decoding that is the continuation the whole stream would have given
(the server sees the same context); sampled, the continuation has its own seed, derived as every
continuation's is (:meth:`~multiverse.remote.tree.Tree.seed_for`). A cut with no token taken is
the transport's to retry (before the first token) or an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from multiverse.engine.request import Branch, Status
from multiverse.remote.transport import Completion, StreamCut
from multiverse.remote.tree import Tree

__all__ = ["Fed", "feed_stream"]


@dataclass(slots=True)
class Fed:
    """What a streamed completion gave its branch: the tokens it took, the server's finish
    reason (``None`` when the driver closed the stream first, or it was cut) and the cut."""

    took: int
    finish_reason: str | None
    cut: StreamCut | None = None


async def feed_stream(tree: Tree, br: Branch, pieces: AsyncIterator[Completion],
                      progress: Callable[[], None] | None = None) -> Fed:  # fmt: skip
    """Feed ``br`` from ``pieces`` (see the module docstring); closes them when done."""
    took, finish = 0, None
    async with contextlib.aclosing(pieces):
        try:
            async for piece in pieces:
                n = tree.feed(br, piece.token_ids, piece.logprobs)
                took += n
                finish = piece.finish_reason
                if n and progress is not None:
                    progress()
                # the rules changed the branch's course (a token inserted, the branch or the
                # request ended): the rest of the stream is not its continuation
                moved = br.status is not Status.RUNNING or br.num_pending
                if n < len(piece.token_ids) or tree.req.finished or moved:
                    return Fed(took, None)
        except StreamCut as cut:
            if took == 0:
                raise
            return Fed(took, None, cut)
    return Fed(took, finish)
