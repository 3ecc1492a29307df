"""What the driver needs to know about a server before it sends anything: :class:`ServerInfo`.

The served model's name and context length (``/v1/models``), the merge modes the server offers,
the tokenizer, the tag ids and the EOS ids. ``multiverse serve`` advertises all of it in its
``/v1/models`` entry (a ``multiverse`` object) and serves its tokenizer files, so the driver
needs no argument against it; a stock engine (vLLM, SGLang, llama.cpp) offers only the ``flat``
merge and needs ``tokenizer=`` (a model or adapter directory, loaded as the engine loads it).

Merge modes (SPEC 4.1): ``exact`` needs a server that lays out a prompt with Multiverse structure
by the layout rule; ``flat`` is any completions server (a stock engine re-prefills the joined
paths causally, at running positions). :func:`choose_merge` picks and checks one. A vLLM
started with this repository's plugin (``plugins/vllm``: the layout rule's positions and a KV
connector for the paths' K/V) is exact too, and only exact: asked for ``exact`` (``probe``),
:func:`discover` finds it by the connector's report in the answer to a one-token probe.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from multiverse.engine.policy import end_ids
from multiverse.format import tokenizer as tokenizers
from multiverse.remote.transport import RemoteError, normalize_base_url

MERGE_MODES = ("exact", "flat")
TOKENIZER_ROUTE = "/v1/multiverse/tokenizer"


@dataclass(slots=True)
class ServerInfo:
    base_url: str
    model: str  # the served model name (sent as ``model``)
    merge_modes: tuple[str, ...]
    multiverse: bool  # a `multiverse serve` (takes the Multiverse request fields)
    tokenizer: Any
    tag_ids: dict[str, int] | None  # None: a tokenizer without the tags (nothing forks)
    eos_token_ids: frozenset[int]
    max_model_len: int | None
    prompt_format: dict[str, Any] | None  # the server's recorded SPEC 1.3 format, if it says
    vllm_plugin: bool = False  # a vLLM with the Multiverse plugin (multiverse_vllm): exact only


def choose_merge(info: ServerInfo, requested: str | None = None) -> str:
    """``requested`` (checked against what the server offers) or the best it offers."""
    if requested is None:
        return "exact" if "exact" in info.merge_modes else "flat"
    if requested not in MERGE_MODES:
        raise ValueError(f"merge mode {requested!r}: choose one of {', '.join(MERGE_MODES)}")
    if requested not in info.merge_modes:
        raise ValueError(f"merge mode {requested!r}: {info.base_url} offers {', '.join(info.merge_modes)} "
                         "(exact needs a server that lays out structured prompts by the layout rule, "
                         "e.g. `multiverse serve`, or a vLLM with the multiverse_vllm plugin)")  # fmt: skip
    return requested


def _get(client: httpx.Client, url: str, what: str) -> Any:
    try:
        resp = client.get(url)
    except httpx.HTTPError as e:
        raise RemoteError(f"{url}: cannot reach the server ({type(e).__name__}: {e})") from None
    if resp.status_code in (401, 403):
        raise RemoteError(f"{url}: HTTP {resp.status_code}: the server wants an API key (--api-key, or "
                          "$MULTIVERSE_API_KEY / $OPENAI_API_KEY)", resp.status_code)  # fmt: skip
    if resp.status_code != 200:
        raise RemoteError(
            f"{url}: HTTP {resp.status_code} asking for {what}: {resp.text[:200]}", resp.status_code
        )
    try:
        return resp.json()
    except ValueError:
        raise RemoteError(f"{url}: {what} is not JSON: {resp.text[:200]!r}") from None


def _load_served_tokenizer(client: httpx.Client, url: str) -> Any:
    body = _get(client, url, "the tokenizer")
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict) or not files:
        raise RemoteError(f"{url}: no tokenizer files in the response")
    with tempfile.TemporaryDirectory(prefix="multiverse-tokenizer-") as tmp:
        for name, text in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise RemoteError(f"{url}: refusing tokenizer file name {name!r}")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return tokenizers.load_tokenizer(tmp)


def _tokenizer_from_dir(directory: str | Path) -> tuple[Any, frozenset[int]]:
    """A tokenizer directory (a model or a LoRA adapter directory) -> (tokenizer, EOS ids), the
    EOS ids as the engine takes them from that checkpoint."""
    # the engine's one rule for a checkpoint's EOS ids
    from multiverse.engine.llm import _checkpoint_eos

    path = Path(directory)
    if not path.exists() and not tokenizers.is_builtin_tokenizer(directory):
        raise ValueError(f"--tokenizer {directory}: no such directory")
    tok = tokenizers.load_tokenizer(directory)
    return tok, end_ids(tok, _checkpoint_eos(path, None, tok) if path.is_dir() else ())


def discover(base_url: str, api_key: str | None = None, served_model: str | None = None,
             tokenizer: str | Path | Any | None = None, timeout: float = 60.0, probe: bool = False) -> ServerInfo:  # fmt: skip
    """Ask the server at ``base_url`` what :class:`ServerInfo` holds. ``tokenizer``: a directory
    (or a loaded tokenizer) to use instead of the server's; a stock engine needs one. ``probe``:
    ask a server without a Multiverse advert whether it is a vLLM with the Multiverse plugin."""
    base = normalize_base_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=timeout) as client:
        listing = _get(client, f"{base}/v1/models", "the model list")
        entries = listing.get("data") if isinstance(listing, dict) else None
        if not entries:
            raise RemoteError(f"{base}/v1/models lists no model")
        names = [str(e.get("id")) for e in entries]
        if served_model is not None and served_model not in names:
            raise ValueError(f"--served-model {served_model}: {base} serves {', '.join(names)}")
        entry = entries[names.index(served_model) if served_model is not None else 0]
        mv = entry.get("multiverse") if isinstance(entry.get("multiverse"), dict) else None
        eos: frozenset[int] = frozenset()
        if tokenizer is None and mv is not None and mv.get("tokenizer"):
            tok = _load_served_tokenizer(client, f"{base}{mv['tokenizer']}")
        elif tokenizer is None:
            raise ValueError(f"{base} is not a `multiverse serve` (its /v1/models says nothing of Multiverse): "
                             "give the model's tokenizer (--tokenizer DIR: the model or adapter directory)")  # fmt: skip
        elif isinstance(tokenizer, (str, Path)):
            tok, eos = _tokenizer_from_dir(tokenizer)
        else:
            tok = tokenizer
            eos = end_ids(tok)
    try:
        tags: dict[str, int] | None = tokenizers.tag_ids(tok)
    except ValueError:
        tags = None
    if mv is not None:
        if mv.get("tag_ids") is not None and tags is not None and mv["tag_ids"] != tags:
            raise ValueError(
                f"{base}: the tokenizer's tag ids {tags} differ from the server's {mv['tag_ids']}"
            )
        eos = frozenset(int(t) for t in mv.get("eos_token_ids") or eos)
    plugin = probe and mv is None and tags is not None and _has_plugin(base, headers, timeout, str(entry.get("id")), tags)
    max_len = entry.get("max_model_len") or (mv or {}).get("max_model_len")
    modes = tuple(m for m in (mv or {}).get("merge_modes", ["flat"]) if m in MERGE_MODES) or (
        "flat",
    )
    if plugin:
        modes = ("exact",)  # the position hook lays out every prompt: a flat merge is not on offer
    return ServerInfo(base, str(entry.get("id")), modes, mv is not None, tok, tags, eos,
                      int(max_len) if max_len else None, (mv or {}).get("prompt_format"),
                      vllm_plugin=plugin)  # fmt: skip


def _has_plugin(base: str, headers: dict[str, str], timeout: float, model: str, tags: dict[str, int]) -> bool:
    """Does the server answer with the Multiverse vLLM connector's report? (One token.)"""
    body = {"model": model, "prompt": [tags["<Parallel>"]], "max_tokens": 1, "temperature": 0.0}
    try:
        resp = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=timeout)
        kv = resp.json().get("kv_transfer_params") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return isinstance(kv, dict) and isinstance(kv.get("multiverse"), dict)
