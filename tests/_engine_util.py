"""Shared helpers for the engine tests: a tiny random Qwen2, engines that check their own state
after every step, the full-sequence reference, and :class:`ModelFree` (the engine's bookkeeping
driven by scripted tokens, no model at all)."""

from __future__ import annotations

import torch

from multiverse.engine.forkjoin import ForkJoin, Specials
from multiverse.engine.kv_manager import KVManager
from multiverse.engine.llm import LLM
from multiverse.engine.model import CausalLM
from multiverse.engine.radix import RadixCache
from multiverse.engine.request import Branch, Request
from multiverse.engine.sampling import SamplingParams
from multiverse.engine.scheduler import Scheduler, Work
from multiverse.format import grammar
from multiverse.format import tokenizer as tokenizer_tags
from multiverse.format.layout import layout


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


class ModelFree:
    """Scheduler + ForkJoin + KVManager (+ prefix cache) stepped the way :meth:`LLM.step` does,
    with no model: a masked chunk's ``attend`` comes from the layout rule (what the runner
    returns), and every sampled token is the request's ``forced_output``. After every step the
    KVManager and every request (finished ones included) pass their ``check_invariants``."""

    def __init__(self, tokenizer, num_slots: int = 512, max_batch_tokens: int = 64, prefill_chunk: int = 16,
                 prefix_cache: bool = False, tags: bool = True) -> None:  # fmt: skip
        self.tok = tokenizer
        self.kv = KVManager(num_slots)
        self.radix = RadixCache(self.kv) if prefix_cache else None
        self.scheduler = Scheduler(self.kv, self.radix, max_batch_tokens, prefill_chunk)
        tag_ids = tokenizer_tags.tag_ids(tokenizer) if tags else None
        self.specials = Specials.from_tokenizer(tokenizer, tag_ids) if tag_ids else None
        self.tag_names = {v: k for k, v in tag_ids.items()} if tag_ids else {}
        self.forkjoin = ForkJoin(self.kv, lambda ids: tokenizer.decode(ids, skip_special_tokens=False), self.specials,
                                 eos_ids=frozenset({tokenizer.eos_token_id}))  # fmt: skip
        self.requests: list[Request] = []
        self.history: list[list[Work]] = []  # the works of every step

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def add(self, prompt: str, output: str, **params) -> Request:
        """A request whose "model" writes ``output`` (greedy, logprobs off)."""
        sp = SamplingParams(temperature=0.0, forced_output=self.encode(output), **params)
        names = self.tag_names if sp.parallel else {}
        req = Request.create(len(self.requests), self.encode(prompt), sp, names, seed=0, forced_ids=sp.forced_output)
        self.requests.append(req)
        return req

    def step(self) -> list[Work]:
        active = [r for r in self.requests if not r.finished]
        works = self.scheduler.schedule(active)
        if not works:
            self.forkjoin.finish(active[0], "kv_capacity")
        for w in works:  # the runner's part: the masked chunk's last row of the layout mask
            if w.masked:
                br = w.branch
                hi = br.prefix_len + w.start + w.count
                row = br.layout(hi).dense_mask(rows=slice(hi - 1, hi))[0, :hi]
                br.set_attend([br.kv[j] for j in row.nonzero()[:, 0].tolist()])
        to_sample = []
        for w in works:
            br, req = w.branch, w.branch.request
            if br.parent is None and not req.finished and not req.prompt_cached and br.num_computed >= req.prompt_len:
                req.mark_prompt_cached()
                if self.radix is not None:
                    self.radix.insert(req.prompt_ids, br.kv[: req.prompt_len], namespace=req.parallel)
            if w.completes and not req.finished and self.forkjoin.on_computed(br):
                to_sample.append(br)
        for br in to_sample:
            if not br.request.finished:
                self.forkjoin.on_sampled(br, self.forkjoin.forced_token(br), None)
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
        live = {b for r in self.requests if not r.finished for b in r.branches()}
        leaked = [h for h in self.kv.holders() if isinstance(h, Branch) and h not in live]
        assert not leaked, f"K/V held by branches outside any live request: {leaked}"

    def text(self, req: Request) -> str:
        """The canonical output so far (the root's tokens after the prompt)."""
        return self.tok.decode(req.root.own_ids[req.prompt_len :], skip_special_tokens=False)
