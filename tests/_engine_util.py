"""Shared helpers for the engine tests: a tiny random Qwen2, engines that check their own state
after every step, the full-sequence reference, and :class:`ModelFree` (the engine's bookkeeping
driven by scripted tokens through the real ``LLM.step``, no model at all)."""

from __future__ import annotations

import torch

from multiverse.engine.llm import LLM
from multiverse.engine.model import CausalLM
from multiverse.engine.model.batch import check_forward_batch
from multiverse.engine.request import Branch, Request
from multiverse.engine.sampling import SamplingParams
from multiverse.engine.scheduler import Work
from multiverse.format import grammar
from multiverse.format import tokenizer as tokenizer_tags
from multiverse.format.layout import layout


def slot_breaks(slots: list[int]) -> int:
    """How many times a K/V slot list jumps (a new run of consecutive slots starts)."""
    return sum(1 for a, b in zip(slots, slots[1:]) if b != a + 1)


def engine(model, tokenizer, **engine_config) -> LLM:
    """``LLM.from_model`` with :meth:`LLM.check_invariants` after every step."""
    return LLM.from_model(model, tokenizer, check_invariants=True, **engine_config)


def tiny_pair(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32):
    """(transformers Qwen2ForCausalLM, our CausalLM with the same random weights)."""
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    ours = CausalLM(cfg)
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


def full_logprobs(hf, tokenizer, ids: list[int], parallel: bool = True) -> torch.Tensor:
    """Log-softmax of one transformers forward over ``ids`` with the layout rule's mask and
    positions (plain causal with ``parallel=False``): ``[n, vocab]``."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        if parallel:
            lay = layout(ids, grammar.tag_ids(tokenizer))
            logits = hf(input_ids=ids_t, position_ids=lay.position_ids[None],
                        attention_mask=lay.hf_attention_mask(torch.float32)).logits[0]  # fmt: skip
        else:
            logits = hf(input_ids=ids_t).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check_output(hf, tokenizer, out, parallel: bool = True, atol: float = 1e-4) -> int:
    """Assert the engine's positions and per-token logprobs equal the full forward's.

    Returns how many logprobs were compared (sampled tokens; engine-inserted ones have none)."""
    n0 = len(out.prompt_token_ids)
    ids = out.prompt_token_ids + out.token_ids
    if parallel:
        lay = layout(ids, grammar.tag_ids(tokenizer))
        assert lay.position_ids[n0:].tolist() == out.position_ids
    else:
        assert out.position_ids == list(range(n0, len(ids)))
    ref = full_logprobs(hf, tokenizer, ids, parallel)
    compared = 0
    if out.logprobs is not None:
        for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            if lp is None:
                continue
            assert abs(ref[n0 + i - 1, tok].item() - lp) < atol, (i, tokenizer.decode([tok]))
            compared += 1
    if out.prompt_logprobs is not None:
        assert out.prompt_logprobs[0] is None
        for i in range(1, n0):
            assert abs(ref[i - 1, ids[i]].item() - out.prompt_logprobs[i]) < atol, i
    return compared


def check_greedy(hf, tokenizer, out, tie_gap: float = 1e-4) -> int:
    """Assert that every token the engine sampled greedily (forking on) is the argmax of ONE
    full-sequence forward of ``hf`` over prompt + output under the layout rule, and that the
    engine's positions are the layout rule's; tokens the engine inserted itself (``out.forced``)
    are not sampled and are skipped. A differing argmax is accepted only as a float-rounding
    tie (logit gap below ``tie_gap``). Returns how many tokens were checked."""
    n0 = len(out.prompt_token_ids)
    full = list(out.prompt_token_ids) + list(out.token_ids)
    lay = layout(full, grammar.tag_ids(tokenizer))
    assert lay.position_ids[n0:].tolist() == list(out.position_ids), (
        "engine positions differ from the layout rule"
    )
    rows = full_logprobs(hf, tokenizer, full)[n0 - 1 : len(full) - 1]  # row i predicts token i
    pred = rows.argmax(-1).tolist()
    checked = 0
    for i, (token, forced) in enumerate(zip(out.token_ids, out.forced, strict=True)):
        if forced:
            continue
        checked += 1
        if pred[i] != token:
            gap = float(rows[i].max() - rows[i, token])
            assert gap < tie_gap, (
                f"generated token {i} ({token}) is not the argmax ({pred[i]}) of the "
                f"full-sequence forward; gap {gap:.3g}; text so far: {out.text[:200]!r}"
            )
    return checked


def assert_no_leak(llm: LLM) -> None:
    llm.check_invariants()
    if llm.radix is not None:
        llm.radix.clear()
    llm.kv.check_invariants()
    assert llm.kv.num_free == llm.kv.num_slots, f"{llm.kv.num_used} KV slots still in use"


def block(labels_and_bodies: list[tuple[str, str]], conclusion: str = "ok") -> str:
    """Canonical text of one <Parallel> block."""
    out = ["<Parallel>\n<Goal>\n"]
    for label, _ in labels_and_bodies:
        out.append(f"<Outline>\n{label}: do {label}\n</Outline>\n")
    out.append("</Goal>\n")
    for label, body in labels_and_bodies:
        out.append(f"<Path>\n{label}: {body}\n</Path>\n")
    out.append(f"<Conclusion>\n{conclusion}\n</Conclusion>\n</Parallel>\n")
    return "".join(out)


class NoModel:
    """A stand-in for :class:`~multiverse.engine.model.CausalLM` without weights: what
    :class:`~multiverse.engine.runner.ModelRunner` and :class:`LLM` read of a model (device,
    dtype, pool shape, vocabulary size, config), and a forward that checks the step's
    :class:`~multiverse.engine.model.ForwardBatch` against its contract and returns zero logits
    (every sampled token then comes from ``forced_output``); ``error``: an exception it raises
    instead."""

    def __init__(self, vocab_size: int) -> None:
        import types

        self.vocab_size = vocab_size
        self.config = types.SimpleNamespace(max_position_embeddings=None)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.num_layers = self.num_kv_heads = self.head_dim = 1  # the smallest K/V pool
        self.forwards = 0
        self.error: Exception | None = None

    def __call__(self, batch, pool) -> torch.Tensor:
        check_forward_batch(batch)
        if self.error is not None:
            raise self.error
        self.forwards += 1
        rows = len(batch.q_lens) if batch.logits_rows is None else batch.logits_rows.numel()
        return torch.zeros(rows, self.vocab_size)


class _WithoutTags:
    """``tokenizer`` as a tokenizer without the 12 Multiverse tags (the engine forks nothing)."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def get_vocab(self) -> dict[str, int]:
        return {t: i for t, i in self._tok.get_vocab().items() if t not in tokenizer_tags.TAGS}


class ModelFree:
    """The real :meth:`LLM.step` (scheduler, :class:`~multiverse.engine.runner.ModelRunner`,
    fork/join, sampling) over :class:`NoModel`: no weights, every sampled token is the
    request's ``forced_output``. After every step the KVManager and every request (finished
    ones included) pass their ``check_invariants`` and no branch outside a live request holds
    K/V. An exception inside the step is raised (not turned into ``finish_reason="error"``).

    ``history``: the works the scheduler gave each step; ``llm``: the engine; ``kv``, ``radix``,
    ``scheduler``, ``forkjoin``, ``specials``: its parts."""

    def __init__(self, tokenizer, num_slots: int = 512, max_batch_tokens: int = 64, prefill_chunk: int = 16,
                 prefix_cache: bool = False, tags: bool = True) -> None:  # fmt: skip
        self.tok = tokenizer
        self.model = NoModel(len(tokenizer))
        self.llm = LLM.from_model(self.model, tokenizer if tags else _WithoutTags(tokenizer),
                                  num_kv_slots=num_slots, max_batch_tokens=max_batch_tokens,
                                  prefill_chunk=prefill_chunk, enable_prefix_cache=prefix_cache)  # fmt: skip
        self.llm._fail = _reraise  # ModelFree tests want the traceback, not a failed request
        self.kv, self.radix, self.scheduler = self.llm.kv, self.llm.radix, self.llm.scheduler
        self.forkjoin, self.specials = self.llm.forkjoin, self.llm.specials
        self.tag_names = {v: k for k, v in tokenizer_tags.tag_ids(tokenizer).items()} if tags else {}
        schedule = self.scheduler.schedule

        def recorded(active):
            self._works = schedule(active)
            return self._works

        self.scheduler.schedule = recorded
        self._works: list[Work] = []
        self.requests: list[Request] = []  # every request added, finished ones included
        self.history: list[list[Work]] = []  # the works of every step

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def add(self, prompt: str, output: str, **params) -> Request:
        """A request whose "model" writes ``output`` (greedy, logprobs off). Added directly (not
        through :meth:`LLM.add_request`, which refuses a prompt larger than the pool)."""
        sp = SamplingParams(temperature=0.0, forced_output=self.encode(output), **params)
        names = self.tag_names if sp.parallel else {}
        req = Request.create(len(self.requests), self.encode(prompt), sp, names, seed=0, forced_ids=sp.forced_output)
        self.requests.append(req)
        self.llm.requests.append(req)
        return req

    def step(self) -> list[Work]:
        """One :meth:`LLM.step`; returns the works scheduled in it."""
        self._works = []
        self.llm.step()
        works = self._works
        self.history.append(works)
        self.check()
        return works

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if all(r.finished for r in self.requests):
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps")

    def check(self) -> None:
        self.kv.check_invariants()
        for r in self.requests:
            r.check_invariants(self.kv)
            assert r.finish_reason != "error", f"request {r.id} failed: {r.error}"
        live = {b for r in self.requests if not r.finished for b in r.branches()}
        leaked = [h for h in self.kv.holders() if isinstance(h, Branch) and h not in live]
        assert not leaked, f"K/V held by branches outside any live request: {leaked}"

    def text(self, req: Request) -> str:
        """The canonical output so far (the root's tokens after the prompt)."""
        return self.tok.decode(req.root.own_ids[req.prompt_len :], skip_special_tokens=False)


def _reraise(*args, **kwargs) -> None:
    raise  # called by LLM inside its ``except`` block: the exception goes on
