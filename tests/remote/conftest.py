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
