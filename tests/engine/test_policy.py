"""The request policy every backend shares (:mod:`multiverse.engine.policy`): one ``max_tokens``
default, one rule for the ids that end an answer, one validation of a chat. The servers and the
driver are checked against the same cases in ``tests/remote/test_remote_policy.py``."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from _engine_util import engine  # noqa: E402
from _policy_cases import BAD_CHATS  # noqa: E402

from multiverse import SamplingParams  # noqa: E402
from multiverse.engine import policy  # noqa: E402
from multiverse.format.prompts import stop_token_ids  # noqa: E402


def test_one_max_tokens_default():
    """``SamplingParams()`` and the server and commands share one default (it was 256 here and
    1024 there)."""
    import argparse

    from multiverse.cli.generate import add_arguments
    from multiverse.server.schemas import CompletionRequest, sampling_params

    assert SamplingParams().max_tokens == policy.DEFAULT_MAX_TOKENS == 1024
    assert sampling_params(CompletionRequest(prompt="x")).max_tokens == SamplingParams().max_tokens
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["q"]).max_tokens == SamplingParams().max_tokens


def test_the_engine_ends_an_answer_at_eos_and_the_chat_turn_end(pair, tok):
    """No caller adds stop ids: the engine's own set, from the one rule, holds the chat turn end
    (before, a model directory without a generation_config went past ``<|im_end|>``)."""
    llm = engine(pair[1], tok, num_kv_slots=512)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert llm.eos_token_ids == policy.end_ids(tok) == {tok.eos_token_id, *stop_token_ids(tok)}
    assert im_end in llm.eos_token_ids
    assert policy.end_ids(tok, [7]) == llm.eos_token_ids | {7}
    out = llm.generate("q", SamplingParams(temperature=0.0, forced_output="ab<|im_end|>cd"))[0]
    assert out.text == "ab" and out.finish_reason == "stop"


def test_check_chat_normalises_a_good_chat():
    chat = [{"role": "developer", "content": "be brief", "name": "x"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}]  # fmt: skip
    assert policy.check_chat(chat) == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]  # fmt: skip
    convs = policy.chat_conversations([[{"role": "user", "content": "x"}]] * 2)
    assert convs == [[{"role": "user", "content": "x"}]] * 2


@pytest.mark.parametrize(("chat", "message"), BAD_CHATS)
def test_llm_chat_refuses_a_bad_chat_with_the_one_message(pair, tok, chat, message):
    with pytest.raises(ValueError) as e:
        policy.check_chat(chat)
    assert str(e.value) == message
    llm = engine(pair[1], tok, num_kv_slots=512)
    with pytest.raises(ValueError) as e:
        llm.chat(chat, SamplingParams(max_tokens=2))
    assert str(e.value) == message
    assert not llm.requests


def test_a_lone_surrogate_is_refused():
    with pytest.raises(ValueError, match=r"messages\[0\].content: not valid Unicode text"):
        policy.check_chat([{"role": "user", "content": "a\ud800"}])
