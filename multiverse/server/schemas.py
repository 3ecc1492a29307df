"""Pydantic request models of the OpenAI-compatible endpoints (what the OpenAPI document shows).

Unknown fields are ignored (clients send fields of newer API versions); every known field is
type- and range-checked here, so a bad request is a 400 with the offending field named
(``param``), never a 500. The Multiverse extensions (``parallel``, ``max_total_tokens``,
``max_depth``, ``max_paths``, ``max_live_branches``, ``timeout``...) sit next to the OpenAI
fields. :func:`sampling_params` turns a request into
:class:`~multiverse.engine.sampling.SamplingParams`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from multiverse.engine.policy import DEFAULT_MAX_TOKENS, check_chat
from multiverse.engine.sampling import MAX_PENALTY, SamplingParams
from multiverse.server.errors import APIError

MAX_TOKENS_LIMIT = 1 << 20  # far beyond any KV pool; a bound keeps arithmetic sane
MAX_STOP = 16
MAX_TOP_LOGPROBS = 1  # the engine keeps the sampled token's logprob only

def _unicode(v: str) -> str:
    """Text a tokenizer can take: JSON can carry a lone surrogate (``"\\ud800"``), Unicode text cannot."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate {v[e.start]!r} at character {e.start}") from None
    return v


Text = Annotated[str, AfterValidator(_unicode)]
NonNegInt = Annotated[int, Field(ge=0, le=(1 << 31) - 1)]
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="send a last chunk with the usage (empty `choices`)")


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="ignored: the server serves one model")
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = Field(
        None, description=f"bound on the sequential depth of the output (default {DEFAULT_MAX_TOKENS})"
    )
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=1 << 20)] = Field(-1, description="-1: off")
    n: Annotated[int, Field(ge=1, le=64)] = Field(1, description="completions per prompt (server limit --max-n)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    presence_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = Field(
        0.0, description="subtracted from the logit of every token the sequence has generated")
    frequency_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = Field(
        0.0, description="times its count so far, subtracted from a generated token's logit")
    user: str | None = None
    # Multiverse extensions
    parallel: bool = Field(True, description="Multiverse: fork at <Parallel> blocks (False: decode sequentially; "
                           "a model without the tags cannot fork: the response's multiverse.forking says so)")
    max_total_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = Field(
        None, description="Multiverse: bound on the tokens of all branches together"
    )
    max_depth: Annotated[int, Field(ge=0, le=64)] = Field(4, description="Multiverse: nesting of forked blocks")
    max_paths: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="Multiverse: paths per block")
    max_live_branches: Annotated[int, Field(ge=1, le=4096)] = Field(
        64, description="Multiverse: branches of one request decoding at once"
    )
    stop_token_ids: Annotated[list[NonNegInt], Field(max_length=256)] | None = None
    ignore_eos: bool = False
    timeout: Annotated[float, Field(gt=0.0, le=86400.0)] | None = Field(
        None, description="seconds from arrival (queue included); the request is aborted with 504 when it runs "
        "longer (default and cap: the server's --request-timeout)"
    )

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and any(not isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        return v


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] | Annotated[
        list[NonNegInt], Field(min_length=1)
    ] = Field(..., description="a string or a list of token ids (a list of one string is accepted)")
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="return the sampled tokens' logprobs (0 or 1; alternatives are not offered)"
    )
    echo: Literal[False] = False
    suffix: None = None
    return_token_ids: bool = Field(False, description="vLLM's: each choice gets `token_ids` (the stop token that "
                                   "ended it kept last) and `stop_reason`; what the fork/join driver reads")


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[Any] = Field(..., description="the chat: [{role: system | developer | user | assistant, "
                                "content: a string or [{type: text, text}]}], checked by "
                                "multiverse.engine.policy.check_chat (as LLM.chat and RemoteLLM.chat check it)")
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    parse_special_tokens: bool = Field(
        False, description="Multiverse, trusted clients: special tokens and tags written in the messages "
        "(<|im_end|>, <Parallel>) become tokens (default: message contents are text; needs the server's "
        "--allow-special-tokens)"
    )

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (text parts joined; developer -> system), or a
        400 with the one chat validation's message (:func:`~multiverse.engine.policy.check_chat`)."""
        try:
            return check_chat(self.messages)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None


def sampling_params(body: _Common, seed_offset: int = 0) -> SamplingParams:
    """The engine's settings for one completion of ``body`` (``seed_offset``: the ``n`` index).
    Its ``stop_token_ids`` are the client's: the backend ends an answer at EOS and the chat turn
    end itself (:func:`multiverse.engine.policy.end_ids`) unless ``ignore_eos``."""
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest):
        max_tokens = max_tokens or body.max_completion_tokens
        logprobs = body.logprobs
    else:
        logprobs = body.logprobs is not None
    seed = None if body.seed is None else (body.seed + seed_offset) & ((1 << 63) - 1)
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=seed,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS, stop=body.stop,
        stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
        logprobs=logprobs, parallel=body.parallel, max_total_tokens=body.max_total_tokens,
        max_depth=body.max_depth, max_paths=body.max_paths, max_live_branches=body.max_live_branches,
    )  # fmt: skip


def completion_prompt(body: CompletionRequest) -> str | list[int]:
    """The one prompt of a completions request: a string, or token ids (a list of one string is
    that string); an empty string is a 400 naming ``prompt``."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    return prompt
