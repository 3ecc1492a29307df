"""The fork/join driver: Multiverse generation over OpenAI-compatible ``/v1/completions`` servers.

``RemoteLLM(base_url).generate(prompts, SamplingParams(...))`` mirrors ``LLM.generate`` and
returns the same :class:`~multiverse.engine.outputs.RequestOutput` (as :class:`RemoteOutput`,
which adds the merge mode, the number of HTTP requests, the replica and the server's prefix-cache
hit rate). SPEC 4.1: Map = one request continuing the branch until ``</Goal>`` (or EOS, a stop, a
bound); Process = one concurrent request per Outline whose prompt is the context + the tokens the
engine inserts (``\\n`` then ``<Path>\\n{label}:``), until ``</Path>``; Reduce = the paths in
outline order + ``<Conclusion>\\n``, continued by the next request. Nesting composes. The rules
are the engine's own (:mod:`multiverse.remote.tree`); the HTTP is :mod:`.transport`'s.

Merge modes (named in every output): ``exact`` against a server that lays out a structured prompt
by the layout rule (``multiverse serve``: the request says ``parallel: true``), so the output is
``LLM.generate``'s token for token under greedy decoding; ``flat`` against a stock engine, which
re-prefills the joined paths causally. Path requests are exact in both. On ``multiverse serve``
each request reuses the K/V of earlier ones (the Reduce: every path's, :mod:`multiverse.engine.reuse`).

Requests run concurrently (all of a batch at once, every path of a fork at once), within one
concurrency limit per replica. Several base URLs are data-parallel replicas: each request goes
to the least busy one, with every one of its sub-requests (so the replica's prefix cache hits).
A failed sub-request (after the retries) finishes its request with ``finish_reason="error"``;
a request that fails or is cancelled cancels every sub-request it has in flight.

Progress: ``agenerate(..., on_progress=f)`` calls ``f(index, request)`` after every piece fed
to the ``index``-th request (``request``: its live branch tree, a
:class:`~multiverse.engine.request.Request`, to read before the next ``await``, never to
change): what ``multiverse serve --base-url`` streams from, with the local server's
:class:`~multiverse.server.streaming.BranchStreamer`. With an ``on_progress`` (or ``stream=True``)
the sub-requests are streamed (:meth:`Replica.stream`, :mod:`.streamed`): each branch is fed
token by token as the server sends them, so progress comes per token; without, each completion
is fed whole when it ends (the reference path: the outputs are the same). Streaming is not used
for requests that ask for logprobs (a streamed chunk carries none from ``multiverse serve``) nor
for exact merges on vLLM's Multiverse plugin (its closing requests and reports); a stock server
is streamed from once it has answered one whole completion without the plugin's report (which
streams do not carry: a plugin server asked for ``flat`` is refused by that answer). A stream that
breaks after tokens arrived is continued from them (at most ``retries`` times per request).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from multiverse.engine.forkjoin import Specials
from multiverse.engine.outputs import RequestOutput
from multiverse.engine.policy import chat_conversations, check_request, end_ids, pair_prompts
from multiverse.engine.request import Branch, Request, Status
from multiverse.engine.sampling import SamplingParams
from multiverse.format.prompts import chat_input
from multiverse.remote.info import ServerInfo, choose_merge, discover
from multiverse.remote.streamed import Fed, feed_stream
from multiverse.remote.transport import Completion, RemoteError, Replica
from multiverse.remote.tree import Tree

__all__ = ["RemoteLLM", "RemoteOutput"]

log = logging.getLogger("multiverse.remote")
MAX_EMPTY = 3  # completions in a row that give a branch no token: the server makes no progress


@dataclass(slots=True)
class RemoteOutput(RequestOutput):
    merge: str = "exact"  # the merge mode this output was made with (SPEC 4.1)
    http_requests: int = 0  # completions calls this request made (retries included)
    base_url: str = ""  # the replica that served it
    prefix_cache_hit_rate: float | None = None  # that replica's, over the generate call (/metrics)


class RemoteLLM:
    """The driver (see the module docstring). ``base_url``: one URL or several (replicas);
    ``tokenizer``: a model/adapter directory, needed for a stock engine (``multiverse serve``
    sends its own); ``merge``: ``exact`` | ``flat`` | None (the best the servers offer);
    ``max_concurrency``: completions in flight per replica; ``transport``: an
    ``httpx.AsyncBaseTransport`` for every replica (tests)."""

    def __init__(self, base_url: str | Sequence[str], *, served_model: str | None = None, api_key: str | None = None,
                 tokenizer: Any = None, merge: str | None = None, max_concurrency: int = 64, timeout: float = 600.0,
                 retries: int = 4, seed: int = 0, transport: Any = None) -> None:  # fmt: skip
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("give at least one base URL")
        if max_concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError("max_concurrency must be >= 1, retries >= 0 and timeout > 0")
        self.infos: list[ServerInfo] = [discover(u, api_key, served_model, tokenizer, probe=merge == "exact")
                                        for u in urls]  # fmt: skip
        info = self.infos[0]
        for other in self.infos[1:]:
            if other.tag_ids != info.tag_ids or other.model != info.model:
                raise ValueError(f"replicas differ: {other.base_url} serves {other.model} with tags {other.tag_ids}, "
                                 f"{info.base_url} {info.model} with {info.tag_ids}")  # fmt: skip
        self.merge = choose_merge(info, merge)
        for other in self.infos[1:]:
            choose_merge(other, self.merge)
        self.tokenizer = info.tokenizer
        self.tag_ids = info.tag_ids
        self.specials = (
            Specials.from_tokenizer(self.tokenizer, info.tag_ids) if info.tag_ids else None
        )
        self.tag_names = {v: k for k, v in info.tag_ids.items()} if info.tag_ids else {}
        self.eos_token_ids = end_ids(self.tokenizer, info.eos_token_ids)  # as the engine's (policy)
        self.api_key, self.max_concurrency, self.timeout, self.retries = (
            api_key,
            max_concurrency,
            timeout,
            retries,
        )
        self.transport = transport
        self._rng = random.Random(seed)
        self.trees: list[Tree] = []  # the last generate call's trees (tests check their invariants)
        self._replicas: list[Replica] | None = None
        self._loop: Any = None

    @property
    def max_model_len(self) -> int | None:
        return self.infos[0].max_model_len

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # -- requests --------------------------------------------------------------------------
    def _tree(self, prompt: str | Sequence[int], params: SamplingParams) -> Tree:
        if not isinstance(params, SamplingParams):  # checked first: the refusals below read it
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.forced_output is not None:
            raise ValueError(
                "forced_output is a test hook of the local engine; a remote model writes its own tokens"
            )
        if params.prompt_logprobs:
            raise ValueError("prompt_logprobs is not offered by the remote driver (the engines skip the prefix "
                             "cache for such requests)")  # fmt: skip
        ids = (
            self.tokenizer.encode(prompt, add_special_tokens=False)
            if isinstance(prompt, str)
            else list(prompt)
        )
        check_request(
            ids, params, context=self.max_model_len
        )  # the engine's rules (the server checks the ids)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        return Tree(
            ids, params, self.specials, self.tag_names, self.eos_token_ids, self._decode, seed
        )

    def _body(self, tree: Tree, br: Branch, model: str, multiverse: bool) -> dict[str, Any] | None:
        """The completions request that continues ``br``, or None when the server's context is
        full (the branch is then ended at that bound, as the engine ends one at its own)."""
        p = tree.req.params
        ids = tree.context(br)
        room = tree.room(br)
        if self.max_model_len:
            room = min(room, self.max_model_len - len(ids))
            if room < 1:
                tree.end_branch(br, "length")
                return None
        stops = set(p.stop_token_ids or [])
        if tree.req.parallel and self.tag_ids:
            stops |= {self.tag_ids["</Goal>"], self.tag_ids["</Path>"]}
        if not p.ignore_eos:
            stops |= self.eos_token_ids
        body: dict[str, Any] = {"model": model, "prompt": ids, "max_tokens": room, "temperature": p.temperature,
                                "top_p": p.top_p, "stop_token_ids": sorted(stops), "return_token_ids": True,
                                "skip_special_tokens": False}  # fmt: skip
        if p.temperature > 0:
            body["seed"] = tree.seed_for(br)
        if p.top_k != -1:
            body["top_k"] = p.top_k
        # an early stop: the ids keep the stop's tokens (vLLM, ours); the engine's rule cuts
        if p.stop:
            body["stop"] = list(p.stop)
        if p.ignore_eos:
            body["ignore_eos"] = True
        if p.logprobs:
            body["logprobs"] = 1
        if multiverse:  # our server: lay the prompt out by the layout rule (exact) or not (flat)
            body.update(parallel=self.merge == "exact" and tree.req.parallel, max_depth=0)
        return body

    async def _run(self, tree: Tree, replica: Replica, info: ServerInfo, counts: list[int],
                   progress: Callable[[], None] | None = None, stream: bool = False) -> None:  # fmt: skip
        """Drive one request to its end (see the module docstring). ``counts[0]``: its calls;
        ``progress()`` after each completion fed (``stream``: after each streamed piece)."""
        tasks: dict[Branch, asyncio.Task[Completion | Fed]] = {}
        empty: dict[Branch, int] = {}
        serial = tree.req.params.serial_branches
        closes = _Closes(tree, info) if info.vllm_plugin and self.merge == "exact" else None
        stream = stream and closes is None and not tree.req.params.logprobs  # streams: no logprobs
        cuts = 0

        async def call(body: dict[str, Any]) -> Completion:
            try:
                comp = await replica.complete(body, counts)
            except RemoteError as e:
                if closes is None or e.status != 500:
                    raise
                raise RemoteError(f"{e} (the Multiverse connector fails a merge whose saved path K/V is gone, "
                                  "e.g. evicted under its cap: the vLLM log names it)", e.status) from None  # fmt: skip
            if closes is not None:
                closes.check(comp)
            elif comp.connector is not None:
                raise RemoteError(f"{replica.base_url} is a vLLM with the Multiverse plugin, which merges exactly "
                                  "only: ask for merge='exact' (--merge exact)")  # fmt: skip
            replica.plain = True  # no plugin: its streams (which carry no report) may be used
            return comp

        try:
            while not tree.req.finished:
                if closes is not None:
                    closes.start(call)
                for br in tree.wanting():
                    if br in tasks or (serial and tasks) or (closes is not None and closes.pending):
                        continue
                    body = self._body(tree, br, info.model, info.multiverse)
                    if body is not None:
                        work = (
                            feed_stream(tree, br, replica.stream(body, counts), progress)
                            if stream and (info.multiverse or replica.plain)
                            else call(body)
                        )
                        tasks[br] = asyncio.create_task(work)
                if tree.req.finished:
                    break
                waiting = [*tasks.values(), *(closes.pending.values() if closes is not None else ())]
                if not waiting:
                    if tree.wanting():
                        continue
                    raise RuntimeError("no branch to wait for, yet the request is not finished")
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if closes is not None:
                    closes.collect(done)
                for br in [b for b, t in tasks.items() if t in done]:
                    comp = tasks.pop(br).result()
                    if tree.req.finished:
                        break
                    if isinstance(comp, Fed):  # streamed: fed as it came
                        took = comp.took
                        if comp.cut is not None:  # tokens came, then it broke: go on from them
                            cuts += 1
                            log.warning("%s (continuing from the tokens received)", comp.cut)
                            if cuts > self.retries:
                                raise comp.cut
                    else:
                        took = tree.feed(br, comp.token_ids, comp.logprobs)
                        if progress is not None:
                            progress()
                    empty[br] = 0 if took else empty.get(br, 0) + 1
                    if empty[br] >= MAX_EMPTY:
                        raise RemoteError(f"{replica.base_url}: {MAX_EMPTY} completions in a row gave no token "
                                          f"(last finish_reason {comp.finish_reason!r})")  # fmt: skip
        except asyncio.CancelledError:
            tree.finish("abort")
            raise
        except Exception as e:  # noqa: BLE001 - one request's failure ends that request only
            log.warning(
                "request failed: %s: %s",
                type(e).__name__,
                e,
                exc_info=not isinstance(e, RemoteError),
            )
            tree.finish("error", f"{type(e).__name__}: {e}")
        finally:
            left = [*tasks.values(), *(closes.pending.values() if closes is not None else ())]
            for t in left:
                t.cancel()
            if left:
                await asyncio.gather(*left, return_exceptions=True)
            tree.finish("abort")  # a no-op once finished; sets the finish time

    # -- generate --------------------------------------------------------------------------
    async def agenerate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                        on_progress: Callable[[int, Request], None] | None = None,
                        stream: bool | None = None) -> list[RemoteOutput]:  # fmt: skip
        """``generate`` as a coroutine (for callers inside an event loop). Cancelling it
        cancels every request's sub-requests. ``on_progress``, ``stream`` (default: streamed
        when there is an ``on_progress``): see the module docstring."""
        stream = on_progress is not None if stream is None else stream
        prompts, plist = pair_prompts(prompts, sampling_params)
        start = time.perf_counter()
        trees = [self._tree(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        self.trees = trees
        replicas = await self._open()
        before = await asyncio.gather(*(r.prefix_cache() for r in replicas))
        counts = [[0] for _ in trees]
        chosen = []
        for tree in trees:  # each request, with all its sub-requests, to the least busy replica
            i = min(range(len(replicas)), key=lambda k: replicas[k].in_flight)
            replicas[i].in_flight += 1
            chosen.append(i)
            tree.req.t_arrival = start
        runs = [
            self._run(t, replicas[i], self.infos[i], n,
                      None if on_progress is None else functools.partial(on_progress, k, t.req), stream)
            for k, (t, i, n) in enumerate(zip(trees, chosen, counts, strict=True))
        ]  # fmt: skip
        try:
            await asyncio.gather(*runs)
        finally:
            for i in chosen:
                replicas[i].in_flight -= 1
        after = await asyncio.gather(*(r.prefix_cache() for r in replicas))
        rates = [_rate(b, a) for b, a in zip(before, after, strict=True)]
        outs = []
        for tree, prompt, i, n in zip(trees, prompts, chosen, counts, strict=True):
            base = tree.output(self.tokenizer, prompt if isinstance(prompt, str) else None, start)
            values = {f.name: getattr(base, f.name) for f in fields(RequestOutput)}
            outs.append(RemoteOutput(**values, merge=self.merge, http_requests=n[0],
                                     base_url=replicas[i].base_url, prefix_cache_hit_rate=rates[i]))  # fmt: skip
        return outs

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RemoteOutput]:  # fmt: skip
        """One output per prompt, in order (``LLM.generate``'s signature; ``use_tqdm`` is
        accepted for it and ignored: the requests run concurrently)."""

        async def once() -> list[RemoteOutput]:
            try:
                return await self.agenerate(prompts, sampling_params)
            finally:
                await self.aclose()

        return asyncio.run(once())

    async def _open(self) -> list[Replica]:
        """The replicas' connection pools and concurrency limits, kept for this event loop."""
        loop = asyncio.get_running_loop()
        if self._replicas is None or self._loop is not loop:
            self._replicas, self._loop = [], loop
            for info in self.infos:
                rep = Replica(info.base_url, self.api_key, self.timeout, self.retries,
                              asyncio.Semaphore(self.max_concurrency), self.transport)  # fmt: skip
                self._replicas.append(await rep.__aenter__())
        return self._replicas

    async def aclose(self) -> None:
        """Close the connection pools (``agenerate`` callers, at their end)."""
        replicas, self._replicas = self._replicas or [], None
        for rep in replicas:
            await rep.__aexit__(None, None, None)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> list[RemoteOutput]:  # fmt: skip
        """``LLM.chat``: each conversation checked (:func:`~multiverse.engine.policy.check_chat`),
        rendered by the chat template, contents as text, and generated."""
        prompts = [chat_input(self.tokenizer, c) for c in chat_conversations(messages)]
        return self.generate(prompts, sampling_params)


class _Closes:
    """Exact merges on a vLLM with the Multiverse plugin (``multiverse_vllm``): each ended path
    is sent once more as a *closing request* (its whole sequence, ``</Path>`` and the separator
    included, one token), so the plugin's KV connector saves the path's K/V; the merged request
    waits for every close (the driver starts nothing while one is pending) and gets the paths'
    K/V from the connector. Every plugin response carries the connector's report; an error in
    it (a path's K/V evicted, over the cap) ends the request with that error."""

    def __init__(self, tree: Tree, info: ServerInfo) -> None:
        self.tree, self.model = tree, info.model
        self.seen: dict[int, Branch] = {}
        self.pending: dict[int, asyncio.Task[Completion]] = {}

    def start(self, call: Any) -> None:
        """Send a closing request for every path that ended since the last look."""
        req = self.tree.req
        live = {b.id: b for b in req.branches()}
        for b in live.values():
            if b.parent is not None:
                self.seen.setdefault(b.id, b)
        for bid, b in list(self.seen.items()):
            if b.status is Status.ENDED or (bid not in live and not req.finished):
                del self.seen[bid]
                body = {"model": self.model, "prompt": b.seq_ids(), "max_tokens": 1, "temperature": 0.0,
                        "return_token_ids": True, "skip_special_tokens": False}  # fmt: skip
                self.pending[bid] = asyncio.create_task(call(body))

    def collect(self, done: set[Any]) -> None:
        for bid, t in list(self.pending.items()):
            if t in done:
                del self.pending[bid]
                t.result()  # a failed close fails the request

    @staticmethod
    def check(comp: Completion) -> None:
        if comp.connector is None:
            raise RemoteError("the server gave no Multiverse connector report: exact needs vLLM started with the "
                              "multiverse_vllm plugin (docs/scale-out.md)")  # fmt: skip
        if comp.connector.get("error"):
            raise RemoteError(f"vLLM Multiverse connector: {comp.connector['error']}")


def _rate(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])
