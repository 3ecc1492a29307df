"""``multiverse serve`` asks chats as ``multiverse generate`` asks prompts: the SPEC 1.3 suffix the
model records goes on the last user message (real uvicorn servers on 127.0.0.1 over the shipped
tiny model, with and without the format); completions are sent as is."""

from __future__ import annotations

import httpx
import pytest
from conftest import API_KEY, running_server

from multiverse.eval import tasks
from multiverse.format.prompts import PROMPT_SUFFIX_PARALLEL, render_chat, user_prompt
from multiverse.locations import find_model
from multiverse.server.prompting import apply_prompt_format, chat_prompt_format
from multiverse.train.summary import prompt_format

QUESTION = tasks.generate(1, split="test", tasks=["countdown"])[0].question
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def with_format(tiny_llm):
    from multiverse.server.app import ServerConfig

    fmt = prompt_format(find_model())
    assert fmt is not None and fmt.parallel  # the shipped Multiverse model records the parallel suffix
    with running_server(tiny_llm, ServerConfig(api_key=API_KEY, prompt_format=fmt)) as (url, _):
        yield url


def _chat(url: str, content: str) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 600, "temperature": 0,
            "timeout": 120}  # fmt: skip
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def _prompt_tokens(llm, content: str) -> int:
    text = render_chat(llm.tokenizer, [{"role": "user", "content": content}])
    return len(llm.tokenizer.encode(text, add_special_tokens=False))


def test_a_chat_gets_the_recorded_suffix(with_format, server, tiny_llm):
    asked = _chat(with_format, QUESTION)  # the bare question: the server adds the suffix
    as_sent = _chat(server[0], QUESTION)  # a server without a prompt format (--no-prompt-suffix)
    suffixed = _prompt_tokens(tiny_llm, user_prompt(QUESTION))
    bare = _prompt_tokens(tiny_llm, QUESTION)
    assert suffixed > bare
    assert asked["usage"]["prompt_tokens"] == suffixed
    assert as_sent["usage"]["prompt_tokens"] == bare
    by_hand = _chat(server[0], user_prompt(QUESTION))  # what a client had to write before
    assert asked["choices"][0]["message"]["content"] == by_hand["choices"][0]["message"]["content"]
    assert asked["multiverse"]["blocks"] >= 1  # asked the way it was trained, the model forks


def test_a_suffix_already_there_is_not_doubled(with_format, tiny_llm):
    d = _chat(with_format, user_prompt(QUESTION))
    assert d["usage"]["prompt_tokens"] == _prompt_tokens(tiny_llm, user_prompt(QUESTION))


def test_completions_are_sent_as_is(with_format, server):
    body = {"prompt": QUESTION, "max_tokens": 5, "temperature": 0}
    a = httpx.post(with_format + "/v1/completions", json=body, headers=HEADERS, timeout=60).json()
    b = httpx.post(server[0] + "/v1/completions", json=body, headers=HEADERS, timeout=60).json()
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_the_rule_on_messages(tmp_path):
    fmt = prompt_format(find_model())
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]  # fmt: skip
    out = apply_prompt_format(chat, fmt)
    assert [m["content"] for m in out] == ["s", "a", "b", "c" + PROMPT_SUFFIX_PARALLEL]
    assert chat[3]["content"] == "c"  # a copy
    assert apply_prompt_format(chat, None) == chat
    assert apply_prompt_format([{"role": "system", "content": "s"}], fmt) == [{"role": "system", "content": "s"}]
    _, note = chat_prompt_format(find_model(), None)
    assert "parallel suffix" in note and "train_summary.json" in note
    assert chat_prompt_format(tmp_path, None)[0] is None  # no record: no suffix
    assert chat_prompt_format(find_model(), None, suffix=False) == (
        None, "prompt format: no chat template (plain rendering), no suffix (--no-prompt-suffix)")  # fmt: skip
