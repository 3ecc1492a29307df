"""The path K/V: a vLLM KV connector (``--kv-transfer-config`` with ``kv_connector_module_path``,
interface ``distributed/kv_transfer/kv_connector/v1/base.py``).

What the driver sends for exact merges (SPEC 4.1): the path requests (context + ``<Path>\\n
{label}:``, until ``</Path>``), then per path a *closing request* (the path's whole sequence,
``</Path>`` and its separator included, one token) and the merged request (prefix + the paths in
outline order + ``<Conclusion>\\n``). The connector works from the token ids alone (:mod:`.plan`):

* **save** (scheduler: :meth:`build_connector_meta`; worker: :meth:`save_kv_layer`): a request
  whose prompt closes a path keeps the per-token K/V of that path (from the block boundary at or
  before its start), under the key of its token sequence;
* **load** (:meth:`get_num_new_matched_tokens`, :meth:`start_load_kv`): a request with sibling
  paths beyond its prefix-cache hit gets their K/V copied from the saved sequences into its
  blocks, so vLLM computes neither them (they would see their siblings) nor anything before
  them; the tokens after (the Conclusion on) it computes itself, at the layout's positions (the
  position hook). K is stored after RoPE, so it carries the path's own positions;
* **bounds**: an entry is freed once a request that loaded it finishes (merged) with its full
  blocks covering what it loaded (vLLM's prefix cache holds it from then on), and otherwise
  kept least-recently-used under a cap of ``max_tokens`` tokens (``kv_connector_extra_config``,
  default 16384): the entries of an aborted family age out. A request that needs an entry that
  is gone *fails* (vLLM's KV load-failure path, ``kv_load_failure_policy="fail"``: its blocks are
  evicted, the request ends with an error), never silently inexact.

Every response carries ``kv_transfer_params.multiverse``: ``{"loaded", "saved", "error"}``.
The K/V are moved with the attention backend's own writer (``impl.do_kv_cache_update``) and read
back through the inverse of that writer, found once per layer shape by writing coded values
into a scratch block: no assumption about the backend's block layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from multiverse_vllm.config import check_positions, model_tag_ids
from multiverse_vllm.plan import Copy, Entries, plan_load, save_range, seq_key

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = init_logger(__name__)
DEFAULT_MAX_TOKENS = 16384


@dataclass
class _Load:
    key: str
    src: int  # index into the saved entry's tokens (entry-relative: minus its start)
    slots: torch.Tensor  # destination slots, one per token


@dataclass
class _Save:
    key: str
    start: int
    slots: torch.Tensor


@dataclass
class MultiverseMeta(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)
    saves: list[_Save] = field(default_factory=list)
    frees: list[str] = field(default_factory=list)
    fail_blocks: list[int] = field(default_factory=list)


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    idx = torch.arange(start, end)
    return (
        torch.tensor(block_ids, dtype=torch.int64)[idx // block_size] * block_size
        + idx % block_size
    )


class MultiverseConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(
        self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_positions(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.max_tokens = int(extra.get("max_tokens", DEFAULT_MAX_TOKENS))
        # scheduler side
        self.tag_ids = (
            model_tag_ids(vllm_config.model_config) if role == KVConnectorRole.SCHEDULER else {}
        )
        self.entries = Entries(self.max_tokens)  # the saved sequences (LRU, capped)
        self.plans: dict[str, list[Copy]] = {}  # request -> the copies it will load
        self.failing: dict[str, tuple[str, int]] = {}  # request -> (why its load fails, local hit)
        self.report: dict[str, dict[str, Any]] = {}
        self.uses: dict[
            str, tuple[set[str], int]
        ] = {}  # request -> (entries loaded, end of the load)
        self._pending: dict[str, tuple[Any, list[int], list[Copy], int | None]] = {}
        self._frees: list[str] = []
        # worker side
        self.store: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._maps: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._fail_blocks: set[int] = set()

    # -- scheduler side --------------------------------------------------------------------
    def _saved(self, key: str) -> tuple[int, int] | None:
        return self.entries.get(key)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        rid = request.request_id
        if request.skip_reading_prefix_cache:  # prompt_logprobs: vLLM computes it all, causally
            return 0, False
        ids = list(request.all_token_ids)
        copies, why = plan_load(ids, self.tag_ids, num_computed_tokens, self._saved)
        rep = self.report.setdefault(rid, {"loaded": 0, "saved": 0, "error": None})
        if why is not None:  # fail the request through vLLM's load-failure path
            end = len(ids) - 1
            self.failing[rid] = (why, num_computed_tokens)
            rep["error"] = f"exact merge impossible: {why}"
            log.warning("Multiverse connector: request %s: %s", rid, why)
            return end - num_computed_tokens, False
        if not copies:
            return 0, False
        total = sum(c.length for c in copies)
        if num_computed_tokens + total >= len(ids):  # vLLM computes at least the last token
            raise AssertionError(f"{rid}: a load plan reaches the last prompt token")
        self.plans[rid] = copies
        return total, False

    def update_state_after_alloc(
        self, request: Request, blocks: Any, num_external_tokens: int
    ) -> None:
        """Called for every request the scheduler takes from its queue (new, or resumed after a
        preemption), with all of its blocks: what to load into them, or to fail."""
        rid = request.request_id
        copies = self.plans.pop(rid, [])
        failing = self.failing.pop(rid, None)
        block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens <= 0:
            copies, failing = [], None
        # entry-relative sources (plan_load checked that each entry is there)
        copies = [
            Copy(c.key, c.src - self.entries.items[c.key][0], c.dst, c.length) for c in copies
        ]
        for c in copies:
            self.entries.touch(c.key)
        if copies:
            keys, end = self.uses.get(rid, (set(), 0))
            self.uses[rid] = (
                keys | {c.key for c in copies},
                max(end, *(c.dst + c.length for c in copies)),
            )
        rep = self.report.setdefault(rid, {"loaded": 0, "saved": 0, "error": None})
        rep["loaded"] += sum(c.length for c in copies)
        self._pending[rid] = (request, block_ids, copies, None if failing is None else failing[1])

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = MultiverseMeta(frees=self._frees)
        self._frees = []
        computed = {
            new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs
        }
        cached = scheduler_output.scheduled_cached_reqs
        for k, rid in enumerate(cached.req_ids):
            if rid in cached.resumed_req_ids:
                computed[rid] = cached.num_computed_tokens[k]
        now = [
            (rid, *self._pending.pop(rid)) for rid in [r for r in self._pending if r in computed]
        ]
        for _, _, block_ids, copies, failing_at in now:  # loads first: a save may evict an entry
            if failing_at is not None:  # the blocks vLLM was to fill from us: failed loads
                meta.fail_blocks.extend(block_ids[failing_at // self.block_size :])
            for c in copies:
                meta.loads.append(
                    _Load(c.key, c.src, _slots(block_ids, c.dst, c.dst + c.length, self.block_size))
                )
        for rid, request, block_ids, _, failing_at in now:
            done = computed[rid] + scheduler_output.num_scheduled_tokens.get(rid, 0)
            save = self._save(request, block_ids, done, meta) if failing_at is None else None
            if save is not None:
                meta.saves.append(save)
        self._pending = {r: v for r, v in self._pending.items() if not v[0].is_finished()}
        return meta

    def _save(
        self, request: Request, block_ids: list[int], done: int, meta: MultiverseMeta
    ) -> _Save | None:
        """The save of a path-closing request whose prompt is complete after this step."""
        ids = list(request.prompt_token_ids or [])
        rng = save_range(ids, self.tag_ids, self.block_size) if ids else None
        if rng is None:
            return None
        rep = self.report.setdefault(request.request_id, {"loaded": 0, "saved": 0, "error": None})
        if done < len(ids):
            rep["error"] = (
                "path not saved: its prompt was prefilled in chunks (raise --max-num-batched-tokens)"
            )
            return None
        key, (start, n) = seq_key(ids), rng
        ok, evicted, why = self.entries.add(key, start, n)
        meta.frees.extend(evicted)
        if why is not None:
            rep["error"] = why
        if not ok:
            return None
        rep["saved"] = n - start
        return _Save(key, start, _slots(block_ids, start, n, self.block_size))

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self.plans.pop(rid, None)
        self.failing.pop(rid, None)
        self._pending.pop(rid, None)
        used, end = self.uses.pop(rid, (set(), 0))
        cached = request.num_computed_tokens // self.block_size * self.block_size
        if request.status.name in ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED") and cached >= end:
            # merged, and the request's full blocks (vLLM's prefix cache, for the requests that
            # continue it) hold every loaded token; else the entries stay, least recently used
            self._frees.extend(self.entries.drop(used))
        rep = self.report.pop(rid, {"loaded": 0, "saved": 0, "error": None})
        return False, {
            "multiverse": {
                **rep,
                "entries": len(self.entries.items),
                "stored_tokens": self.entries.used,
            }
        }

    # -- worker side -----------------------------------------------------------------------
    def _layer(self, layer_name: str) -> Any:
        from vllm.forward_context import get_forward_context

        return get_forward_context().no_compile_layers[layer_name]

    def _map(self, layer: Any, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Within-block flat indices of token t's K and V ``[block_size, heads, head_size]``,
        found by writing coded values with the backend's own writer into a scratch block."""
        h, d, bs = layer.num_kv_heads, layer.head_size, self.block_size
        sig = (tuple(kv.shape[1:]), kv.dtype, h, d)
        if sig in self._maps:
            return self._maps[sig]
        codes = []
        grid = torch.meshgrid(torch.arange(bs), torch.arange(h), torch.arange(d), indexing="ij")
        for g in grid:
            scratch = torch.zeros((1, *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
            code = (g + 1).to(kv.dtype).to(kv.device)
            layer.impl.do_kv_cache_update(
                layer, code, -code, scratch, torch.arange(bs, device=kv.device)
            )
            codes.append(scratch.flatten().float().cpu())
        sign = torch.sign(codes[0])
        ok = (sign != 0) & (codes[1] != 0) & (codes[2] != 0)
        cells = torch.nonzero(ok).flatten()
        if len(cells) != 2 * bs * h * d:
            raise RuntimeError(f"Multiverse connector: the {type(layer.impl).__name__} cache writer is not a "
                               f"permutation of per-token K/V ({len(cells)} of {2 * bs * h * d} cells)")  # fmt: skip
        t, hh, dd = (codes[i][cells].abs().long() - 1 for i in range(3))
        out = []
        for want in (1, -1):
            m = sign[cells] == want
            idx = torch.full((bs, h, d), -1, dtype=torch.int64)
            idx[t[m], hh[m], dd[m]] = cells[m]
            if (idx < 0).any():
                raise RuntimeError(
                    "Multiverse connector: the cache writer's layout could not be read back"
                )
            out.append(idx.to(kv.device))
        self._maps[sig] = (out[0], out[1])
        return self._maps[sig]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MultiverseMeta)
        self._fail_blocks.update(meta.fail_blocks)
        for ld in meta.loads:
            entry = self.store.get(ld.key)
            if entry is None:  # cannot happen while scheduler and worker agree; fail, never guess
                log.error("Multiverse connector: entry %s missing on the worker", ld.key)
                self._fail_blocks.update((ld.slots // self.block_size).tolist())
                continue
            n = len(ld.slots)
            for name, (k, v) in entry.items():
                layer = forward_context.no_compile_layers[name]
                kv = layer.kv_cache
                slots = ld.slots.to(kv.device)
                layer.impl.do_kv_cache_update(
                    layer, k[ld.src : ld.src + n], v[ld.src : ld.src + n], kv, slots
                )
        for key in meta.frees:
            self.store.pop(key, None)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MultiverseMeta)
        if not meta.saves:
            return
        layer = self._layer(layer_name)
        kmap, vmap = self._map(layer, kv_layer)
        for sv in meta.saves:
            slots = sv.slots.to(kv_layer.device)
            blocks, offs = slots // self.block_size, slots % self.block_size
            ub, inv = torch.unique(blocks, return_inverse=True)
            flat = kv_layer[ub].reshape(len(ub), -1)
            k = flat[inv[:, None, None], kmap[offs]].clone()
            v = flat[inv[:, None, None], vmap[offs]].clone()
            self.store.setdefault(sv.key, {})[layer_name] = (k, v)

    def wait_for_save(self) -> None:
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._fail_blocks = self._fail_blocks, set()
        return out
