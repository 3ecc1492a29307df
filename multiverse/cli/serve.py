"""``multiverse serve``: an OpenAI-compatible HTTP server over the fork/join engine.

The command only: the options, the model reference, uvicorn. The server itself (endpoints,
streaming with live branches, cancellation, limits, auth, metrics) is :mod:`multiverse.server`;
fastapi and uvicorn are imported lazily (extra ``server``).

Chat requests are asked as ``multiverse generate`` asks its prompts: the last user message gets
the SPEC 1.3 suffix the model records in ``train_summary.json`` (:mod:`multiverse.server.prompting`,
the same rule), unless it already ends with it; ``--no-prompt-suffix`` sends chats as written.
``/v1/completions`` takes raw text and changes nothing (``generate --raw``). The format in use is
printed at start-up. Message contents are text: special tokens and tags written in them stay
characters, unless a request sets ``parse_special_tokens`` and the server runs with
``--allow-special-tokens`` (trusted clients only).

``--host`` / ``--port`` are tried before the model loads (a bad port, a port in use: one line,
exit 2).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from multiverse.cli.common import (
    UsageError,
    add_device_arguments,
    add_model_argument,
    add_remote_arguments,
    add_threads_argument,
    apply_threads,
    load_engine,
    record_dir,
    remote_engine,
    remote_prompt_format,
    resolve_model_and_adapter,
)


def create_app(llm: Any, model_name: str = "multiverse", config: Any = None) -> Any:
    """:func:`multiverse.server.app.create_app` (imported lazily: fastapi is an extra)."""
    from multiverse.server.app import create_app as make

    return make(llm, model_name, config)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--no-prompt-suffix", action="store_true",
                   help="send chat messages as written (default: the last user message gets the SPEC 1.3 "
                   "suffix the model records in train_summary.json, as `multiverse generate` does; a model "
                   "recording none gets none; /v1/completions is always sent as is)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0-65535 (default 8000; 0: any free port)")
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="honour a chat request's parse_special_tokens: special tokens and tags written in its "
                   "messages (<|im_end|>, <Parallel>) become tokens; for trusted clients only (default: refused "
                   "with 400; message contents are text)")  # fmt: skip
    add_device_arguments(p)
    add_threads_argument(p)
    p.add_argument("--name", help="model name reported by /v1/models (default: the directory or file name)")
    p.add_argument("--api-key", default=None,
                   help="default: $MULTIVERSE_API_KEY (prefer it: a key on the command line is visible to "
                   "every user of the machine in `ps`); with a key, every endpoint but /health needs "
                   "'Authorization: Bearer KEY'; none: open")  # fmt: skip
    p.add_argument("--max-concurrent-requests", type=int, default=64, metavar="N",
                   help="requests in the engine's running batch at once (default 64)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting beyond those; more get 429 with Retry-After (default 256)")  # fmt: skip
    p.add_argument("--max-n", type=int, default=8, metavar="N", help="largest `n` of a request (default 8)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="B",
                   help="largest request body; larger gets 413 (default 1 MiB)")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="seconds before a request is aborted (504): the default of a request's `timeout` "
                   "and its cap (default 600)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests get to finish before they are aborted (default 30)")  # fmt: skip
    p.add_argument("--kv-slots", type=int, default=None, metavar="N", help="KV pool size in tokens (default: by memory)")
    add_remote_arguments(p, key_flag="--upstream-api-key")


def _check(args: argparse.Namespace) -> None:
    for name in ("max_concurrent_requests", "max_n", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise UsageError("--max-queue must be >= 0")
    if args.request_timeout <= 0 or args.shutdown_timeout < 0:
        raise UsageError("--request-timeout must be > 0 and --shutdown-timeout >= 0")


def run(args: argparse.Namespace) -> int:
    import sys

    if args.base_url:
        return run_remote(args)
    try:
        model, adapter = resolve_model_and_adapter(args.model, args.adapter)
        _check(args)
        apply_threads(args.threads)
    except UsageError as e:
        print(f"multiverse serve: error: {e}", file=sys.stderr)
        return 2
    try:
        import uvicorn  # noqa: F401

        from multiverse.server.app import ServerConfig
        from multiverse.server.prompting import chat_prompt_format
        from multiverse.server.runner import check_bind, exposure_warning, serve
    except ImportError:
        print("multiverse serve: error: needs the server extra: pip install 'multiverse[server]'", file=sys.stderr)
        return 2
    try:
        check_bind(args.host, args.port)  # before the model loads
    except ValueError as e:
        print(f"multiverse serve: error: {e}", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("MULTIVERSE_API_KEY") or None
    warning = exposure_warning(args.host, api_key)
    if warning:
        print(f"multiverse serve: warning: {warning}", file=sys.stderr)
    print(f"loading {model}" + (f" + adapter {adapter}" if adapter is not None else "") + " ...", file=sys.stderr)
    extra = {"num_kv_slots": args.kv_slots} if args.kv_slots else {}
    try:
        llm = load_engine(model, args.device, args.dtype, adapter, cuda_graphs=args.cuda_graphs,
                          quantization=args.quantization, **extra)  # fmt: skip
        fmt, note = chat_prompt_format(record_dir(model, adapter), llm.tokenizer, not args.no_prompt_suffix)
    except ValueError as e:  # UsageError, or an invalid train_summary.json
        print(f"multiverse serve: error: {e}", file=sys.stderr)
        return 2
    print(f"{note} on /v1/chat/completions; /v1/completions: sent as is", file=sys.stderr)
    config = ServerConfig(prompt_format=fmt, api_key=api_key, max_queue=args.max_queue,
                          max_concurrent_requests=args.max_concurrent_requests, max_body_bytes=args.max_body_bytes,
                          max_n=args.max_n, request_timeout=args.request_timeout,
                          shutdown_timeout=args.shutdown_timeout,
                          allow_special_tokens=args.allow_special_tokens)  # fmt: skip
    named = adapter if adapter is not None else model
    app = create_app(llm, args.name or (named.stem if named.is_file() else named.name), config)
    serve(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)
    return 0


def run_remote(args: argparse.Namespace) -> int:
    """``serve --base-url``: our API in front of the fleet (:mod:`multiverse.server.remote_app`)."""
    import sys

    _check(args)
    try:
        from multiverse.server.app import ServerConfig
        from multiverse.server.remote_app import create_remote_app
        from multiverse.server.runner import exposure_warning, serve
    except ImportError:
        raise UsageError("needs the server extra: pip install 'multiverse[server]'") from None
    remote = remote_engine(args, "serve")
    fmt, note = remote_prompt_format(remote, args, not args.no_prompt_suffix)
    api_key = args.api_key or os.environ.get("MULTIVERSE_API_KEY") or None
    warning = exposure_warning(args.host, api_key)
    if warning:
        print(f"multiverse serve: warning: {warning}", file=sys.stderr)
    print(f"fork/join driver over {', '.join(i.base_url for i in remote.infos)} (merge {remote.merge}); "
          f"{note} on /v1/chat/completions", file=sys.stderr)  # fmt: skip
    config = ServerConfig(prompt_format=fmt, api_key=api_key, max_queue=args.max_queue,
                          max_concurrent_requests=args.max_concurrent_requests, max_body_bytes=args.max_body_bytes,
                          max_n=args.max_n, request_timeout=args.request_timeout,
                          shutdown_timeout=args.shutdown_timeout,
                          allow_special_tokens=args.allow_special_tokens)  # fmt: skip
    app = create_remote_app(remote, args.name or remote.infos[0].model, config)
    serve(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)
    return 0
