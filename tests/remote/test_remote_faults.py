"""Fault injection against a real ``multiverse serve`` (shipped tiny model): a 500 in the middle
of a path and 429s are retried (same output as without them), a stream cut in the middle of a
path goes on from the tokens received (same output); a failure that retrying does not
cure, a server that hangs and a client that aborts all end every request with a finish reason,
and no sub-request is left running on the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import httpx
import pytest
from _serving import agenerate_and_close
from conftest import API_KEY, tiny_problems, wait_idle

from multiverse.engine.sampling import SamplingParams
from multiverse.format.prompts import chat_prompt, stop_token_ids
from multiverse.format.tokenizer import tag_ids
from multiverse.remote import RemoteLLM


class Faulty(httpx.AsyncBaseTransport):
    """A real transport with faults on chosen completions calls (1-based): ``"500-mid"`` sends
    the call to the server, drops the connection 0.3 s into it and answers 500; ``"429"``
    answers 429 at once. ``fail_prompt``: every call for the prompt starting with those ids
    fails so."""

    def __init__(
        self, faults: dict[int, str] | None = None, fail_prompt: list[int] | None = None
    ) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.faults, self.fail_prompt = faults or {}, fail_prompt
        self.n = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/completions"):
            return await self.inner.handle_async_request(request)
        self.n += 1
        fault = self.faults.get(self.n)
        body = json.loads(request.content)
        if (
            self.fail_prompt
            and body["prompt"][: len(self.fail_prompt)] == self.fail_prompt
            and self.n > 1
        ):
            fault = "500-mid"
        if fault == "429":
            return httpx.Response(
                429, headers={"Retry-After": "0"}, json={"error": {"message": "busy"}}
            )
        if fault == "500-mid":
            call = asyncio.ensure_future(self.inner.handle_async_request(request))
            await asyncio.sleep(0.3)
            call.cancel()
            with contextlib.suppress(BaseException):
                await call
            return httpx.Response(500, json={"error": {"message": "injected failure"}})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _params(tok) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=1024, stop_token_ids=stop_token_ids(tok))


@pytest.fixture(scope="module")
def reference(tiny_local):
    tok = tiny_local.tokenizer
    prompts = [chat_prompt(tok, q) for q in tiny_problems(2)]
    return prompts, tiny_local.generate(prompts, _params(tok))


@pytest.mark.parametrize(
    "faults", [{3: "500-mid"}, {2: "429", 4: "429"}], ids=["500-mid-path", "429"]
)
def test_retried_faults_change_nothing(reference, tiny_server, faults):
    prompts, local = reference
    url, app, llm = tiny_server
    driver = RemoteLLM(url, api_key=API_KEY, transport=Faulty(faults))
    out = driver.generate(prompts[0], _params(driver.tokenizer))[0]
    assert out.finish_reason == local[0].finish_reason and out.token_ids == local[0].token_ids
    plain = RemoteLLM(url, api_key=API_KEY).generate(prompts[0], _params(driver.tokenizer))[0]
    assert out.http_requests == plain.http_requests + len(faults)
    assert wait_idle(app, llm)


def test_a_failing_request_ends_with_error_and_the_others_go_on(reference, tiny_server):
    prompts, local = reference
    url, app, llm = tiny_server
    tok = llm.tokenizer
    bad = tok.encode(prompts[0], add_special_tokens=False)
    driver = RemoteLLM(url, api_key=API_KEY, retries=1, transport=Faulty(fail_prompt=bad))
    outs = driver.generate(prompts, _params(tok))
    assert outs[0].finish_reason == "error" and "injected failure" in outs[0].error
    assert (
        outs[1].token_ids == local[1].token_ids and outs[1].finish_reason == local[1].finish_reason
    )
    for tree in driver.trees:
        tree.check_invariants()
    assert wait_idle(app, llm), "a sub-request of the failed request is still running on the server"


@contextlib.contextmanager
def gated(llm):
    """The server's engine hangs in its next step until the block exits."""
    gate = threading.Event()
    step = llm.step

    def hanging_step():
        gate.wait(60)
        return step()

    llm.step = hanging_step
    try:
        yield
    finally:
        gate.set()
        del llm.step


def test_a_hanging_server_times_out_and_frees_the_work(reference, tiny_server):
    prompts, _ = reference
    url, app, llm = tiny_server
    driver = RemoteLLM(url, api_key=API_KEY, timeout=1.0, retries=1)
    with gated(llm):
        out = driver.generate(prompts[0], _params(driver.tokenizer))[0]
        assert out.finish_reason == "error" and "Timeout" in out.error
    assert wait_idle(app, llm), "the timed-out sub-requests are still running on the server"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_abort_cancels_every_sub_request(reference, tiny_server, stream):
    prompts, _ = reference
    url, app, llm = tiny_server
    driver = RemoteLLM(url, api_key=API_KEY)

    async def abort_while_paths_run() -> None:
        task = asyncio.ensure_future(
            driver.agenerate(prompts, _params(driver.tokenizer), stream=stream)
        )
        for _ in range(2000):
            await asyncio.sleep(0.005)
            if len(llm.requests) >= 2:  # paths in flight
                break
        running = len(llm.requests)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert running >= 2, "the sub-requests were not in flight when the client aborted"

    asyncio.run(abort_while_paths_run())
    assert all(t.req.finished and t.req.finish_reason == "abort" for t in driver.trees)
    for tree in driver.trees:
        tree.check_invariants()
    assert wait_idle(app, llm), (
        "sub-requests of the aborted requests are still running on the server"
    )


class CutStreams(httpx.AsyncBaseTransport):
    """A real transport whose streamed path requests (prompt with a ``<Path>`` and no
    ``<Conclusion>``) break after ``after`` events: the first ``cuts`` of them (all: ``None``)."""

    def __init__(
        self, path_tag: int, conclusion_tag: int, after: int = 5, cuts: int | None = 1
    ) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.tags, self.after, self.cuts, self.done = (path_tag, conclusion_tag), after, cuts, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/completions"):
            return resp
        body = json.loads(request.content)
        path = self.tags[0] in body["prompt"] and self.tags[1] not in body["prompt"]
        if not (body.get("stream") and path and (self.cuts is None or self.done < self.cuts)):
            return resp
        self.done += 1
        return httpx.Response(resp.status_code, headers=resp.headers, stream=_Cut(resp.stream, self.after),
                              extensions=resp.extensions)  # fmt: skip

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Cut(httpx.AsyncByteStream):
    def __init__(self, inner, after: int) -> None:
        self.inner, self.after = inner, after

    async def __aiter__(self):
        seen = 0
        async for part in self.inner:
            yield part
            seen += part.count(b"data: ")
            if seen >= self.after:
                raise httpx.ReadError("injected: the connection dropped in the middle of a path")

    async def aclose(self) -> None:
        await self.inner.aclose()


def _streamed(driver, prompts, params):
    return agenerate_and_close(driver, prompts, params, stream=True)


def test_a_stream_cut_in_the_middle_of_a_path_goes_on_from_the_tokens_received(
    reference, tiny_server
):
    prompts, local = reference
    url, app, llm = tiny_server
    tags = tag_ids(llm.tokenizer)
    cut = CutStreams(tags["<Path>"], tags["<Conclusion>"])
    driver = RemoteLLM(url, api_key=API_KEY, transport=cut)
    out = _streamed(driver, prompts[0], _params(driver.tokenizer))[0]
    assert cut.done == 1  # the fault happened
    assert out.finish_reason == local[0].finish_reason and out.token_ids == local[0].token_ids
    plain = _streamed(RemoteLLM(url, api_key=API_KEY), prompts[0], _params(driver.tokenizer))[0]
    assert out.http_requests == plain.http_requests + 1  # one more request: the rest of the path
    driver.trees[0].check_invariants()
    assert wait_idle(app, llm), "the cut stream's sub-request is still running on the server"


def test_streams_that_keep_breaking_end_the_request_with_an_error(reference, tiny_server):
    prompts, _ = reference
    url, app, llm = tiny_server
    tags = tag_ids(llm.tokenizer)
    driver = RemoteLLM(url, api_key=API_KEY, retries=2, transport=CutStreams(tags["<Path>"], tags["<Conclusion>"],
                                                                            after=2, cuts=None))  # fmt: skip
    out = _streamed(driver, prompts[0], _params(driver.tokenizer))[0]
    assert out.finish_reason == "error" and "stream broke" in out.error
    driver.trees[0].check_invariants()
    assert wait_idle(app, llm)
