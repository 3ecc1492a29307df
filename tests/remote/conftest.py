"""Servers for the driver's tests: a real ``multiverse serve`` app (uvicorn on 127.0.0.1, a free
port, in a thread) over its own engine, and a *scripted endpoint* (:mod:`scripted`): an
OpenAI-compatible completions server whose "model" is a script, for models that loop."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from _serving import free_port, serve_app  # noqa: F401 (the tests import them from here)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("tenacity")

API_KEY = "remote-test-key"
FRONT_KEY = "front-key"  # the key of `front`, our API in front of tiny_server


@contextmanager
def multiverse_server(llm, **config):
    """A real ``multiverse serve`` app over ``llm`` (which it then owns): (url, app)."""
    from multiverse.server.app import ServerConfig, create_app

    app = create_app(llm, "tiny", ServerConfig(api_key=API_KEY, **config))
    try:
        with serve_app(app) as url:
            yield url, app
    finally:
        app.state.engine.close()


def wait_idle(app, llm, seconds: float = 10.0) -> bool:
    """Has the server dropped every request (engine thread idle, no request in the engine)?"""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if app.state.engine.idle() and not llm.requests:
            return True
        time.sleep(0.05)
    return False


def tiny_problems(n: int) -> list[str]:
    """Held-out countdown problems the shipped tiny model forks on, as it is asked them."""
    from multiverse.cli.demo_model import demo_problems
    from multiverse.eval.datasets import synthetic_tasks_for
    from multiverse.locations import find_model

    return [r.question for r in demo_problems(n, synthetic_tasks_for(find_model()).tasks)]


@pytest.fixture(scope="module")
def tiny_local():
    """The reference: the local engine on the shipped tiny model."""
    from multiverse.engine.llm import LLM
    from multiverse.locations import find_model

    return LLM(str(find_model()), num_kv_slots=16384)


@pytest.fixture(scope="module")
def tiny_server():
    """A real `multiverse serve` over its own engine on the shipped tiny model: (url, app, llm)."""
    from multiverse.engine.llm import LLM
    from multiverse.locations import find_model

    llm = LLM(str(find_model()), num_kv_slots=16384)
    with multiverse_server(llm, max_n=2) as (url, app):
        yield url, app, llm


@pytest.fixture(scope="module")
def front(tiny_server):
    """`multiverse serve --base-url` over tiny_server (key FRONT_KEY, max_n 2): its URL."""
    from multiverse.remote import RemoteLLM
    from multiverse.server.app import ServerConfig
    from multiverse.server.remote_app import create_remote_app

    remote = RemoteLLM(tiny_server[0], api_key=API_KEY)
    app = create_remote_app(remote, "front", ServerConfig(api_key=FRONT_KEY, max_n=2))
    with serve_app(app) as url:
        yield url


def hook_diffs(url: str, model_dir: str, ids: list[int], positions) -> tuple[float, float, str]:
    """A vLLM's prompt logprobs of ``ids`` against a causal transformers forward of ``model_dir``
    at ``positions`` and at running positions: (max |diff| at positions, at running, the HF
    architecture). Used by the plugin's position-hook tests."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    served = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {
        "model": served,
        "prompt": ids,
        "max_tokens": 1,
        "prompt_logprobs": 0,
        "temperature": 0.0,
    }
    plp = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()["choices"][0]
    theirs = torch.tensor(
        [plp["prompt_logprobs"][i][str(ids[i])]["logprob"] for i in range(1, len(ids))]
    )
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def diff(pos: torch.Tensor) -> float:
        with torch.no_grad():
            logits = hf(input_ids=x, position_ids=pos[None]).logits[0, :-1].float()
        ours = logits.log_softmax(-1).gather(1, x[0, 1:, None])[:, 0]
        return (ours - theirs).abs().max().item()

    return diff(positions), diff(torch.arange(len(ids))), hf.config.architectures[0]


@contextmanager
def slow_backend(llm, seconds: float = 0.02):
    """Each engine step of ``llm`` takes ``seconds`` longer, so sub-requests are still in flight
    when a client goes away; the engine's own ``step`` again on exit."""
    step = llm.step

    def slow_step():
        time.sleep(seconds)
        return step()

    llm.step = slow_step
    try:
        yield
    finally:
        del llm.step
