"""One request policy for every entry point: the same bad chat gets the same message from the
local server, from ``serve --base-url`` in front of it, from ``RemoteLLM.chat`` and from
``LLM.chat`` (one validator, :func:`multiverse.engine.policy.check_chat`); the server advertises
the engine's end ids and the driver ends answers at the same ones."""

from __future__ import annotations

import httpx
import pytest
from _policy_cases import BAD_CHATS
from conftest import API_KEY, FRONT_KEY

from multiverse.engine.policy import end_ids
from multiverse.engine.sampling import SamplingParams
from multiverse.remote import RemoteLLM


@pytest.fixture(scope="module")
def remote(tiny_server):
    return RemoteLLM(tiny_server[0], api_key=API_KEY)


@pytest.mark.parametrize(("chat", "message"), BAD_CHATS)
def test_every_entry_point_refuses_a_bad_chat_with_the_same_message(
    tiny_server, front, remote, chat, message
):
    url, _, llm = tiny_server
    for base, key in ((url, API_KEY), (front, FRONT_KEY)):
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": chat, "max_tokens": 2},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)  # fmt: skip
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["message"], err["param"]) == (message, "messages")
    for backend in (remote, llm):  # the driver, and the engine (refused before it is touched)
        with pytest.raises(ValueError) as e:
            backend.chat(chat, SamplingParams(max_tokens=2))
        assert str(e.value) == message


def test_the_driver_ends_answers_where_the_engine_does(tiny_server, remote):
    url, _, llm = tiny_server
    assert llm.eos_token_ids == end_ids(
        llm.tokenizer
    )  # the tiny model's generation_config + the rule
    advert = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert (
        set(advert["data"][0]["multiverse"]["eos_token_ids"])
        == llm.eos_token_ids
        == remote.eos_token_ids
    )


def test_a_good_chat_through_the_driver_is_the_engines(tiny_server, remote):
    """RemoteLLM.chat asks what LLM.chat asks (contents as text), so the answers are the same."""
    _, _, llm = tiny_server
    chat = [{"role": "user", "content": "Count down by 3 from a 11 <Parallel>"}]
    sp = SamplingParams(temperature=0.0, max_tokens=40)
    via = remote.chat(chat, sp)[0]
    from multiverse.engine.llm import LLM

    local = LLM.from_model(llm.model, llm.tokenizer, num_kv_slots=4096).chat(chat, sp)[0]
    assert via.prompt_token_ids == local.prompt_token_ids and via.token_ids == local.token_ids
