"""A real server for the tests: uvicorn on 127.0.0.1 (a free port) in a thread, over the
shipped ``multiverse-tiny`` (it forks on the countdown prompts), API key ``test-key``."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from _serving import free_port, serve_app  # noqa: F401 (the tests import free_port from here)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

API_KEY = "test-key"
FORKING = "Count down by 3 from a 11, b 10 as far as it goes. What is the sum of the ends? Think step by step and in parallel before answering."


@contextmanager
def running_server(llm, config, name: str = "tiny"):
    """Yield the base URL of a uvicorn server over ``create_app(llm, name, config)``."""
    from multiverse.server.app import create_app

    app = create_app(llm, name, config)
    try:
        with serve_app(app) as url:
            yield url, app
    finally:
        app.state.engine.close()


@pytest.fixture(scope="session")
def tiny_llm():
    from multiverse.engine.llm import LLM
    from multiverse.locations import find_model

    return LLM(str(find_model()), num_kv_slots=16384)


@pytest.fixture(scope="session")
def server(tiny_llm):
    from multiverse.server.app import ServerConfig

    with running_server(tiny_llm, ServerConfig(api_key=API_KEY, max_n=4)) as (url, app):
        app.llm = tiny_llm
        yield url, app


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
