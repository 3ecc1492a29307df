"""Radix-tree prefix cache across requests: token ids -> KV slots, LRU eviction. Pure Python.

What may be cached: the K/V of token ``i`` depends on token ids ``0..i`` only, because the layout
rule (positions and visibility, :mod:`multiverse.format.layout`) is decided left to right: a prefix's
layout is the prefix of the full sequence's layout. So the K/V of any prompt prefix can be reused
by any later prompt that starts with the same ids *and is laid out by the same rule*. The engine
keeps one namespace per rule (the layout rule with ``parallel=True`` vs plain positions with
``parallel=False``). It caches each prompt once computed, and when a request ends (not with
``"error"``) every token its root computed: prompt and output. That holds for an output that
forked too: the engine computes every token by the layout rule (a path at its layout positions,
seeing the prefix and itself; the Conclusion seeing every path), and after the merge the root's
K/V list is prefix + path 1 + path 2 + ... in canonical order: exactly the K/V a structured
prefill of that sequence computes. So a follow-up request that extends an output (the remote
driver's path and Reduce requests extend its Map and path 1 requests) prefills only the rest;
the Reduce request's later paths are found by their own requests' sequences (:mod:`.reuse`).

Ownership: every node holds references to its slots in the :class:`KVManager` (holder = the node).
A request that hits the cache takes its own references (``KVManager.share``), so evicting a node
never frees K/V a running branch still reads; eviction only frees slots nobody else holds. A slot
may be held by several nodes: a structured prompt adopts its paths' K/V from their own entries
(:mod:`.reuse`), and its entry then lists those slots too. So a slot is *cache-only* (freeable)
when every reference to it is a node's (``kv.refcount(s) == self._refs[s]``), and it is freed
once every node holding it is gone.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from multiverse.engine.kv_manager import KVManager


@dataclass(slots=True, eq=False)
class _Node:
    key: list[int]  # token ids on the edge into this node
    slots: list[int]  # their KV slots, same length
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)
    last_used: int = 0


class RadixCache:
    """Longest-prefix matching of token-id sequences to cached KV slots."""

    def __init__(self, kv: KVManager) -> None:
        self.kv = kv
        self._roots: dict[Hashable, _Node] = {}
        self._clock = itertools.count(1)
        self.queried_tokens = 0  # tokens looked up by match() (the prefix-cache hit rate's denominator)
        self.hit_tokens = 0  # of those, found cached
        self._num_tokens = 0  # tokens on all edges (the server reads it every step)
        self._refs = [0] * kv.num_slots  # per slot: how many nodes hold it

    def _root(self, namespace: Hashable) -> _Node:
        if namespace not in self._roots:
            self._roots[namespace] = _Node([], [])
        return self._roots[namespace]

    # -- lookup ----------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], namespace: Hashable = None, *, skip: int = 0,
              query: bool = True) -> list[int]:  # fmt: skip
        """Slots of the longest cached prefix of ``tokens`` (may end inside an edge), from index
        ``skip`` on (empty when the hit does not pass it). The hit-rate counters take
        ``tokens[skip:]`` as looked up (not when ``query`` is false: tokens already counted)
        and the slots returned as hits."""
        out = self._walk(tokens, namespace, next(self._clock))[skip:]
        self.queried_tokens += max(0, len(tokens) - skip) if query else 0
        self.hit_tokens += len(out)
        return out

    def peek(self, tokens: Sequence[int], namespace: Hashable = None) -> list[int]:
        """:meth:`match` without side effects (LRU order and counters stay): for a look ahead."""
        return self._walk(tokens, namespace, None)

    def _walk(self, tokens: Sequence[int], namespace: Hashable, now: int | None) -> list[int]:
        node, i, out = self._roots.get(namespace), 0, []
        while node is not None and i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _common(child.key, tokens, i)
            out.extend(child.slots[:n])
            if now is not None:
                child.last_used = now
            i += n
            if n < len(child.key):
                break
            node = child
        return out

    # -- insertion -------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], slots: Sequence[int], namespace: Hashable = None) -> int:
        """Cache ``tokens`` -> ``slots`` (the caller's computed K/V); returns how many tokens
        were newly cached. Already-cached parts keep their existing slots."""
        if len(tokens) != len(slots):
            raise ValueError(f"insert: {len(tokens)} tokens but {len(slots)} slots")
        node, i = self._root(namespace), 0
        now = next(self._clock)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(list(tokens[i:]), list(slots[i:]), node, last_used=now)
                self.kv.share(leaf, leaf.slots)
                for s in leaf.slots:
                    self._refs[s] += 1
                node.children[tokens[i]] = leaf
                self._num_tokens += len(leaf.key)
                return len(tokens) - i
            n = _common(child.key, tokens, i)
            child.last_used = now
            if n < len(child.key):
                self._split(child, n)
                child = node.children[tokens[i]]  # the new middle node, fully matched
            node, i = child, i + n
        return 0

    def _split(self, node: _Node, n: int) -> None:
        """Cut ``node``'s edge after ``n`` tokens: a new middle node takes the first ``n``."""
        parent = node.parent
        assert parent is not None
        mid = _Node(node.key[:n], node.slots[:n], parent, {node.key[n]: node}, node.last_used)
        self.kv.transfer(node, mid, mid.slots)
        parent.children[node.key[0]] = mid
        node.key, node.slots, node.parent = node.key[n:], node.slots[n:], mid

    # -- eviction ----------------------------------------------------------------------------
    def _free_tail(self, node: _Node) -> int:
        """How many of ``node``'s last slots only cache nodes hold. A request holds a prefix of
        a cached path (a hit may end inside an edge: a root takes all but its prompt's last
        token) or a path's run inside an edge (:mod:`.reuse`), so the slots to free are a
        suffix of the edge."""
        k = 0
        for s in reversed(node.slots):
            if not self._cache_only(s):
                break
            k += 1
        return k

    def _cache_only(self, slot: int) -> bool:
        return self.kv.refcount(slot) == self._refs[slot]

    def _evictable(self, node: _Node) -> bool:
        return not node.children and self._free_tail(node) > 0

    def _nodes(self) -> list[_Node]:
        out, stack = [], [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _any_cache_only(self, node: _Node) -> bool:
        return any(self._cache_only(s) for s in node.slots)

    def evictable_slots(self) -> int:
        """Slots that :meth:`evict` could free right now: every slot only cache nodes hold
        (each once, however many nodes hold it)."""
        return len({s for n in self._nodes() for s in n.slots if self._cache_only(s)})

    def evict(self, num_slots: int) -> int:
        """Free at least ``num_slots`` slots if possible; slots a request holds are never freed.
        Least recently used leaves go first (a leaf whose head a request reads is split and only
        its tail goes). If that is not enough, a node the cache alone holds above one a request
        reads (the request computed its prompt before that prefix was cached, so it holds its
        own copy) goes with its subtree: the request keeps its slots, the cache forgets them.
        Returns the slots freed."""
        heap = [(n.last_used, id(n), n) for n in self._nodes() if self._evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_slots:
            _, _, node = heapq.heappop(heap)
            keep = len(node.slots) - self._free_tail(node)
            if keep:
                self._split(node, keep)  # the head stays, a leaf a request reads
            parent = node.parent
            freed += self._drop(node)
            if parent is not None and parent.parent is not None and self._evictable(parent):
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        if freed < num_slots:
            stranded = sorted((n for n in self._nodes() if self._any_cache_only(n)), key=lambda n: n.last_used)
            for node in stranded:
                if freed >= num_slots:
                    break
                if node.parent is not None:  # not gone with an ancestor already
                    freed += self._drop_subtree(node)
        return freed

    def _drop(self, node: _Node) -> int:
        assert node.parent is not None and not node.children
        del node.parent.children[node.key[0]]
        node.parent = None
        self._num_tokens -= len(node.key)
        return self._release(node)

    def _release(self, node: _Node) -> int:
        for s in node.slots:
            self._refs[s] -= 1
        return self.kv.release(node)

    def _drop_subtree(self, node: _Node) -> int:
        assert node.parent is not None
        del node.parent.children[node.key[0]]
        freed, stack = 0, [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            n.children, n.parent = {}, None
            self._num_tokens -= len(n.key)
            freed += self._release(n)
        return freed

    def clear(self) -> int:
        """Drop every cached prefix (slots still held by requests stay allocated)."""
        freed = 0
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                freed += self._release(node)
            root.children.clear()
        self._num_tokens = 0
        return freed

    def num_cached_tokens(self) -> int:
        """Tokens cached (O(1): kept by insert and the drops; :meth:`check` recounts them)."""
        return self._num_tokens

    def check(self) -> None:
        """Raise ``AssertionError`` unless the count of cached tokens matches the tree's edges,
        every node holds exactly its edge's slots in the :class:`KVManager` and each slot's count
        of holding nodes is right."""
        nodes = self._nodes()
        refs = [0] * self.kv.num_slots
        for n in nodes:
            for s in n.slots:
                refs[s] += 1
        if refs != self._refs:
            s = next(i for i, (a, b) in enumerate(zip(refs, self._refs)) if a != b)
            raise AssertionError(f"radix counts {self._refs[s]} nodes holding slot {s}, {refs[s]} do")
        total = sum(len(n.key) for n in nodes)
        if total != self._num_tokens:
            raise AssertionError(f"radix counts {self._num_tokens} cached tokens, its edges hold {total}")
        for n in nodes:
            if len(n.key) != len(n.slots):
                raise AssertionError(f"radix node with {len(n.key)} tokens and {len(n.slots)} slots")
            self.kv.check_holder(n, n.slots)


def _common(key: Sequence[int], tokens: Sequence[int], start: int) -> int:
    n, limit = 0, min(len(key), len(tokens) - start)
    while n < limit and key[n] == tokens[start + n]:
        n += 1
    return n
