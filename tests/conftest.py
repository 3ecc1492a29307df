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
