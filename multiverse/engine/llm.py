"""Public API of the fork/join engine: ``LLM(model_dir).generate(prompts, SamplingParams(...))``.

One engine step = schedule (:mod:`.scheduler`), run (:mod:`.runner`: reads the state, returns
logits and the masked chunks' new ``attend`` lists), postprocess: those ``attend`` lists, prompt
logprobs, the fork/join transitions (:mod:`.forkjoin`), sampling (:mod:`.sampling`). Outputs are
in canonical order: ``token_ids`` is the text a trainer would see (all branches merged in
outline order), ``forced`` marks the tokens the engine inserted itself.

With ``check_invariants=True`` every step ends with :meth:`LLM.check_invariants` (the
KVManager's invariants, every request's :meth:`~multiverse.engine.request.Request.check_invariants`,
no K/V held by a branch outside a live request): for tests, at a cost linear in the K/V lists.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from multiverse.engine.forkjoin import ForkJoin, Specials
from multiverse.engine.kv_manager import KVManager
from multiverse.engine.model import KVPool
from multiverse.engine.model.graphs import Capturer, EagerCapturer
from multiverse.engine.model.quant import DEFAULT_INT4_GROUP_SIZE, check_quantization
from multiverse.engine.outputs import RequestOutput, Usage, build_output, progress
from multiverse.engine.policy import chat_conversations, check_request, end_ids, pair_prompts
from multiverse.engine.radix import RadixCache
from multiverse.engine.request import Branch, Request
from multiverse.engine.runner import ModelRunner, StepOutput
from multiverse.engine.sampling import SamplingParams, request_seed, sample, token_logprobs
from multiverse.engine.scheduler import Scheduler, Work
from multiverse.format import tokenizer as tokenizer_tags
from multiverse.format.prompts import chat_input

__all__ = ["LLM", "RequestOutput", "SamplingParams", "Usage"]

log = logging.getLogger(__name__)


class LLM:
    """The engine. ``LLM(model_dir, device="cpu", dtype="float32", **engine_config)``.

    engine_config: ``num_kv_slots`` (pool size in tokens) or ``kv_memory`` (bytes, or a fraction
    <= 1 of the free device memory / available RAM; default: half the free GPU memory, 1 GiB on
    CPU), ``max_batch_tokens``, ``prefill_chunk``,
    ``enable_prefix_cache``, ``gguf_file``, ``tokenizer`` (overrides the checkpoint's),
    ``eos_token_ids`` (extra EOS ids, by default the directory's ``generation_config.json``
    ``eos_token_id``; the engine ends an answer at these, the tokenizer's EOS and the chat turn
    end: :func:`multiverse.engine.policy.end_ids`),
    ``adapter`` (a PEFT LoRA adapter directory applied to ``model``, the base, merged at load;
    ``model`` may also be an adapter directory itself, its base named in its
    ``train_summary.json``: :mod:`multiverse.engine.adapter`),
    ``check_invariants`` (check the engine state after every step; default off),
    ``cuda_graphs`` (decode steps replay CUDA graphs captured at start-up for batch and K/V-length
    buckets; default: on for a CUDA model, unavailable on CPU), ``static_decode`` (decode steps
    run the fixed-shape step without graphs; default: ``cuda_graphs``; on CPU a test/inspection
    aid), ``graph_max_batch`` / ``graph_max_kv`` (the largest bucket, default 64 / 16384, capped
    at ``max_batch_tokens`` / the pool; bigger steps run eagerly, as do the buckets whose capture
    fails: one warning each), ``graph_capturer`` (a
    :class:`~multiverse.engine.model.graphs.Capturer`, for tests), ``seed``
    (:func:`~multiverse.engine.sampling.request_seed`'s ``rng``; default None: the OS),
    ``quantization`` (``None``, ``"int8"`` or ``"int4"``: weight-only, CPU, the model quantised in
    place at set-up; ``quant_group_size`` the int4 group, default 32:
    :mod:`multiverse.engine.model.quant`). Without the Multiverse tags in the tokenizer nothing
    forks: a warning once, ``forking="unavailable"``.
    """

    def __init__(self, model: Any, device: str = "cpu", dtype: str = "float32", **engine_config: Any) -> None:
        tokenizer = engine_config.pop("tokenizer", None)
        check_quantization(engine_config.get("quantization"), device,
                           engine_config.get("quant_group_size", DEFAULT_INT4_GROUP_SIZE))  # fmt: skip
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from multiverse.engine.loader import load_model

            path, adapter = model, engine_config.pop("adapter", None)
            model, loaded_tok, _ = load_model(model, dtype=dtype, device=device, adapter=adapter,
                                              gguf_file=engine_config.pop("gguf_file", None),
                                              keep_adapter_base=engine_config.get("quantization") == "int4")  # fmt: skip
            tokenizer = tokenizer or loaded_tok
            engine_config.setdefault("eos_token_ids", _checkpoint_eos(path, adapter, loaded_tok))
        if tokenizer is None:
            raise ValueError("LLM needs a tokenizer: the model directory has none; pass tokenizer=")
        self._setup(model, tokenizer, **engine_config)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, **engine_config: Any) -> LLM:
        """An engine over an already loaded :class:`~multiverse.engine.model.CausalLM`."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, **engine_config)
        return self

    def _setup(self, model: Any, tokenizer: Any, num_kv_slots: int | None = None,
               kv_memory: float | None = None, max_batch_tokens: int = 2048, prefill_chunk: int = 512,
               enable_prefix_cache: bool = True, seed: int | None = None,
               eos_token_ids: Sequence[int] | None = None, check_invariants: bool = False,
               cuda_graphs: bool | None = None, static_decode: bool | None = None,
               graph_max_batch: int | None = None, graph_max_kv: int | None = None,
               graph_capturer: Capturer | None = None, quantization: str | None = None,
               quant_group_size: int = DEFAULT_INT4_GROUP_SIZE) -> None:  # fmt: skip
        if quantization is not None:
            model.quantize_(quantization, quant_group_size)
        self.model, self.tokenizer = model, tokenizer
        on_cuda = model.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device (this one is on {model.device}); "
                             "static_decode=True runs the same fixed-shape step without graphs")  # fmt: skip
        cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        static_decode = cuda_graphs if static_decode is None else bool(static_decode)
        if cuda_graphs and not static_decode:
            raise ValueError("cuda_graphs=True captures the static decode step: static_decode=False contradicts it")
        if num_kv_slots is not None and (isinstance(num_kv_slots, bool) or not isinstance(num_kv_slots, int)
                                         or num_kv_slots < 1):  # fmt: skip
            raise ValueError(f"num_kv_slots must be a positive integer (or None: the default), got {num_kv_slots!r}")
        slots = num_kv_slots if num_kv_slots is not None else _default_slots(model, kv_memory)
        self.kv = KVManager(slots)
        self.radix = RadixCache(self.kv) if enable_prefix_cache else None
        self.scheduler = Scheduler(self.kv, self.radix, max_batch_tokens, prefill_chunk)
        capturer = graph_capturer or (None if cuda_graphs else EagerCapturer())
        self.runner = ModelRunner(model, slots, static_decode=static_decode, capturer=capturer,
                                  graph_max_batch=graph_max_batch, graph_max_kv=graph_max_kv,
                                  max_step_rows=max_batch_tokens)  # fmt: skip
        if cuda_graphs and self.runner.graphs is not None:
            self.runner.graphs.capture_all()
        try:
            tags = tokenizer_tags.tag_ids(tokenizer)
        except ValueError:
            tags = None  # a plain model: every request decodes sequentially
        self.specials = Specials.from_tokenizer(tokenizer, tags) if tags else None
        self._tag_names = {v: k for k, v in tags.items()} if tags else {}
        self.eos_token_ids = end_ids(tokenizer, eos_token_ids or ())  # the one rule (engine.policy)
        self.forkjoin = ForkJoin(self.kv, self._decode, self.specials, on_release=self.runner.forget,
                                 on_finish=self._cache_finished, eos_ids=self.eos_token_ids)  # fmt: skip
        self.checks_invariants = check_invariants
        self.requests: list[Request] = []
        self._rng = random.Random(seed) if seed is not None else None
        self._warned_no_tags = False
        self._next_id = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _cache_finished(self, req: Request) -> None:
        """A request ended (not by an error: its last K/V may be unwritten): the prefix cache
        takes every token its root computed, prompt and output (:mod:`.radix`, What may be cached)."""
        root = req.root
        if self.radix is not None and req.finish_reason != "error" and root.resident and root.kv:
            self.radix.insert(root.own_ids[: len(root.kv)], root.kv, namespace=req.parallel)

    # -- requests --------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams) -> Request:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        check_request(ids, params, vocab_size=self.model.vocab_size, num_slots=self.kv.num_slots,
                      context=getattr(self.model.config, "max_position_embeddings", None))  # fmt: skip
        if params.parallel and self.specials is None and not self._warned_no_tags:
            self._warned_no_tags = True
            log.warning("the tokenizer has no Multiverse tags: forking is unavailable, requests with "
                        "parallel=True decode sequentially (outputs say forking='unavailable')")
        names = self._tag_names if params.parallel else {}
        forced = params.forced_output
        if isinstance(forced, str):
            forced = self.tokenizer.encode(forced, add_special_tokens=False)
        seed = request_seed(params.seed, self._rng)
        req = Request.create(self._next_id, ids, params, names, seed=seed, forced_ids=forced,
                             t_arrival=time.perf_counter())  # fmt: skip
        self._next_id += 1
        self.requests.append(req)
        return req

    def has_unfinished(self) -> bool:
        return any(not r.finished for r in self.requests)

    def abort(self, request: Request | int) -> bool:
        """Between two steps: finish ``request`` (a :class:`Request` or its id) and every live
        branch of it with ``finish_reason="abort"``; its KV slots go back to the pool and it
        leaves :attr:`requests`. :meth:`output` still gives its text so far. Returns False
        (and does nothing) when it is unknown or already finished."""
        rid = request.id if isinstance(request, Request) else request
        req = next((r for r in self.requests if r.id == rid and not r.finished), None)
        if req is None:
            return False
        self.forkjoin.finish(req, "abort")
        req.set_finish_time(time.perf_counter())
        self.requests = [r for r in self.requests if r is not req]
        return True

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one engine step; returns the requests that finished in it (none, and nothing is
        run, when no request is unfinished). Requests may be added (:meth:`add_request`) between
        steps."""
        active = [r for r in self.requests if not r.finished]
        if not active:
            return []
        works = self.scheduler.schedule(active)
        if not works:  # nothing fits: the first request alone exceeds the KV pool
            self.forkjoin.finish(active[0], "kv_capacity")
        else:
            try:
                out = self.runner.run(works)
            except Exception:  # find the culprit: each request's works on their own
                self._isolate(works)
            else:
                self._postprocess(works, out)
        done = [r for r in active if r.finished]
        now = time.perf_counter()
        for r in done:
            r.set_finish_time(now)
        self.requests = [r for r in self.requests if not r.finished]
        if self.checks_invariants:
            self.check_invariants(active)
        return done

    def check_invariants(self, requests: Sequence[Request] | None = None) -> None:
        """Raise ``AssertionError`` naming the first inconsistency: the KVManager's bookkeeping
        (prefix-cache nodes included: :meth:`RadixCache.check`), each request's branches
        (default: every unfinished one), K/V held by a branch that belongs to no unfinished
        request (a leak)."""
        self.kv.check_invariants()
        if self.radix is not None:
            self.radix.check()
        for r in self.requests if requests is None else requests:
            r.check_invariants(self.kv)
        live = {b for r in self.requests for b in r.branches()}
        for holder in self.kv.holders():
            if isinstance(holder, Branch) and holder not in live:
                raise AssertionError(f"{holder} holds KV slots {self.kv.held(holder)[:8]}... but is not live")

    def _fail(self, req: Request) -> None:
        """Finish ``req`` with ``finish_reason="error"`` (message kept, traceback logged) after an exception."""
        import logging
        import sys

        err = sys.exc_info()[1]
        logging.getLogger(__name__).error("request %d failed (finish_reason error)", req.id, exc_info=err)
        self.forkjoin.finish(req, "error", error=f"{type(err).__name__}: {err}")

    def _isolate(self, works: list[Work]) -> None:
        """The runner raised: run the step one request at a time (the runner only reads; each
        request's works read only its own slots and shared prompt prefixes); a request that
        raises again finishes with ``"error"``, the others go on."""
        groups: dict[int, list[Work]] = {}
        for w in works:
            groups.setdefault(id(w.branch.request), []).append(w)
        if len(groups) == 1:
            self._fail(works[0].branch.request)
            return
        for group in groups.values():
            try:
                out = self.runner.run(group)
            except Exception:
                self._fail(group[0].branch.request)
            else:
                self._postprocess(group, out)

    def _postprocess(self, works: list[Work], out: StepOutput) -> None:
        """Apply the step's results; an exception finishes only the request it came from."""
        for i, attend in out.attend_updates.items():  # before any fork / merge reads them
            works[i].branch.set_attend(attend)
        to_sample: list[tuple[Branch, int]] = []
        for i, w in enumerate(works):
            if w.branch.request.finished:
                continue
            try:
                if self._computed(w, out, i):
                    to_sample.append((w.branch, out.sample_row[i]))
            except Exception:
                self._fail(w.branch.request)
        to_sample = [(br, row) for br, row in to_sample if not br.request.finished]
        if not to_sample:
            return
        try:
            results = self._sample(to_sample, out.logits)
        except Exception:  # one row at a time (draws are stateless): only the culprit fails
            results = []
            for item in to_sample:
                try:
                    results += self._sample([item], out.logits)
                except Exception:
                    self._fail(item[0].request)
        for br, tok, lp in results:
            if not br.request.finished:
                try:
                    self.forkjoin.on_sampled(br, tok, lp)
                except Exception:
                    self._fail(br.request)

    def _computed(self, w: Work, out: StepOutput, i: int) -> bool:
        """One work's chunk is computed: prompt logprobs, the prefix cache, fork/join; True when
        its branch samples now."""
        br, req = w.branch, w.branch.request
        if w.prompt_rows:
            rows = out.prompt_rows[i]
            nxt = [req.prompt_ids[w.start + r + 1] for r in w.prompt_rows]
            lps = token_logprobs(out.logits[rows[0] : rows[-1] + 1], nxt)
            req.set_prompt_logprobs(w.start + w.prompt_rows[0] + 1, lps)
        if br.parent is None and not req.prompt_cached and br.num_computed >= req.prompt_len:
            req.mark_prompt_cached()
            if self.radix is not None:
                self.radix.insert(req.prompt_ids, br.kv[: req.prompt_len], namespace=req.parallel)
        return w.completes and self.forkjoin.on_computed(br)

    def _sample(self, items: list[tuple[Branch, int]], logits: torch.Tensor) -> list[tuple[Branch, int, float | None]]:
        params, streams, forced, want, generated = [], [], [], [], []
        for br, _ in items:
            p = br.request.params
            params.append(p)
            streams.append((br.seed, len(br.own_ids)))  # the branch's n-th draw
            forced.append(self.forkjoin.forced_token(br))
            want.append(bool(p.logprobs) or forced[-1] is not None)
            generated.append(br.seq_ids()[br.request.prompt_len :] if p.penalized else None)
        rows = [r for _, r in items]
        if rows != list(range(logits.shape[0])):  # else every row in order: no copy
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        tokens, lps = sample(logits, params, streams, forced, want, generated)
        return [(br, tok, lp) for (br, _), tok, lp in zip(items, tokens, lps, strict=True)]

    # -- generate --------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:  # fmt: skip
        """One output per prompt, in order. Prompts are strings or token-id lists."""
        prompts, plist = pair_prompts(prompts, sampling_params)
        start = time.perf_counter()
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        bar = progress(len(reqs)) if use_tqdm else None
        pending = {r.id for r in reqs}
        while pending:
            for r in self.step():
                if r.id in pending:
                    pending.discard(r.id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [self.output(r, p if isinstance(p, str) else None, start) for r, p in zip(reqs, prompts, strict=True)]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> list[RequestOutput]:  # fmt: skip
        """Apply the tokenizer's chat template (generation prompt added) and generate; message
        contents are text (:func:`multiverse.format.prompts.encode_chat`); each conversation is
        checked by :func:`~multiverse.engine.policy.check_chat` (``ValueError`` naming the field)."""
        prompts = [chat_input(self.tokenizer, c) for c in chat_conversations(messages)]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def output(self, req: Request, prompt: str | None = None, start: float | None = None) -> RequestOutput:
        """The output of a finished request (``start``: when its timing begins; default its arrival)."""
        return build_output(self.tokenizer, req, prompt, start)


def _checkpoint_eos(path: Any, adapter: Any, tokenizer: Any) -> list[int]:
    """The default extra EOS ids of a loaded checkpoint: its ``generation_config.json``'s; an
    adapter's (``adapter=``, or ``path`` an adapter directory) or else, the tokenizer's chat
    stop tokens (the base's generation config is for the base's tokenizer)."""
    from multiverse.engine.adapter import is_adapter_dir
    from multiverse.format.prompts import stop_token_ids

    if adapter is None and not is_adapter_dir(path):
        return _generation_eos(path)
    return _generation_eos(adapter if adapter is not None else path) or (
        stop_token_ids(tokenizer) if tokenizer is not None else [])  # fmt: skip


def _generation_eos(path: Any) -> list[int]:
    """EOS ids from a checkpoint directory's ``generation_config.json`` (an int or a list)."""
    import json
    from pathlib import Path

    cfg = Path(path) / "generation_config.json"
    if not cfg.is_file():
        return []
    try:
        eos = json.loads(cfg.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(x) for x in eos]


def _default_slots(model: Any, kv_memory: float | None) -> int:
    per = KVPool.bytes_per_slot(model.config, model.dtype)
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget = free * (kv_memory if kv_memory is not None and kv_memory <= 1 else 0.5)
        if kv_memory is not None and kv_memory > 1:
            budget = kv_memory
    elif kv_memory is not None and kv_memory <= 1:  # a fraction of the available RAM
        import os

        budget = kv_memory * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    else:
        budget = kv_memory if kv_memory is not None else 1 << 30
    return max(256, min(int(budget // per), 1 << 22))
