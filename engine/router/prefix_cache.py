"""Radix prefix cache: a tree over token ids mapping prompt prefixes to KV slots (page = 1 token).

Each edge of the tree carries a run of token ids and the KV slots of those positions; the path
from the root to a node spells a prefix whose K/V already sit in the pool. The tree is one owner
of every slot it holds (one reference through `KVSlotAllocator.incref`), beside the running
sequences, which hold references of their own.

Contract with the user (the scheduler):

- `match_prefix(ids)` returns the slots of the longest cached prefix of `ids` and the node that
  ends it. A sequence that uses those slots takes its own references (`allocator.incref`) and
  `lock(node)`s the path, so no slot of it is evicted while the sequence runs; `unlock(node)`
  when done.
- `insert(ids, slots)` adds a computed prefix. The tree takes a reference on the slots it did not
  have; for the part already cached it keeps its own slots, and the caller's duplicates stay the
  caller's. The caller drops its own references afterwards, as it always does.
- `evict(n)` drops the tree's references of least-recently-used unlocked leaves (trimming a leaf
  from its tail, token by token) until `n` slots went back to the free stack or nothing
  evictable is left.

When every running sequence that references tree slots has locked a node covering them, the
unlocked part of the tree holds slots nobody else references, so `num_evictable_tokens` is
exactly what `evict` can return to the allocator.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from engine.router.slot_allocator import KVSlotAllocator


class RadixNode:
    """One edge of the tree (`key` tokens and their `slots`) and the node it leads to."""

    __slots__ = ("parent", "children", "key", "slots", "lock_ref", "last_access")

    def __init__(self, parent: RadixNode | None, key: list[int], slots: list[int], last_access: int = 0) -> None:
        self.parent = parent
        self.children: dict[int, RadixNode] = {}  # first token of the child's key -> child
        self.key = key
        self.slots = slots
        self.lock_ref = 0  # sequences whose matched path runs through this node
        self.last_access = last_access

    def __repr__(self) -> str:
        return f"RadixNode(key={self.key}, lock_ref={self.lock_ref}, children={len(self.children)})"


def _common_len(key: list[int], ids: Sequence[int], start: int) -> int:
    n = min(len(key), len(ids) - start)
    i = 0
    while i < n and key[i] == ids[start + i]:
        i += 1
    return i


class RadixPrefixCache:
    def __init__(self, allocator: KVSlotAllocator) -> None:
        self.allocator = allocator
        self.root = RadixNode(None, [], [])
        self._clock = 0  # logical time of the last access, for LRU
        self._num_cached = 0
        self._num_locked = 0  # tokens in nodes with lock_ref > 0

    # -- counters ----------------------------------------------------------------------------------

    @property
    def num_cached_tokens(self) -> int:
        """Slots the tree holds a reference on."""
        return self._num_cached

    @property
    def num_evictable_tokens(self) -> int:
        """Cached tokens on no locked path."""
        return self._num_cached - self._num_locked

    # -- lookup and insertion ------------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], RadixNode]:
        """Slots of the longest cached prefix of `token_ids`, and the node where it ends (the root
        when nothing matches). A match ending inside an edge splits it, so the node ends exactly
        there."""
        self._clock += 1
        node, pos, slots = self.root, 0, []
        while pos < len(token_ids):
            child = node.children.get(token_ids[pos])
            if child is None:
                break
            k = _common_len(child.key, token_ids, pos)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = self._clock
            slots.extend(child.slots)
            pos += k
            node = child
        return slots, node

    def insert(self, token_ids: Sequence[int], slots: Sequence[int]) -> int:
        """Cache `slots` as the K/V of `token_ids`; returns how many leading tokens were cached
        already (their slots in `slots` are not taken)."""
        if len(token_ids) != len(slots):
            raise ValueError(f"{len(token_ids)} token ids but {len(slots)} slots")
        self._clock += 1
        node, pos = self.root, 0
        while pos < len(token_ids):
            child = node.children.get(token_ids[pos])
            if child is None:
                new = RadixNode(node, list(token_ids[pos:]), list(slots[pos:]), self._clock)
                self.allocator.incref(new.slots)
                node.children[new.key[0]] = new
                self._num_cached += len(new.key)
                return pos
            k = _common_len(child.key, token_ids, pos)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = self._clock
            pos += k
            node = child
        return pos

    def _split(self, child: RadixNode, k: int) -> RadixNode:
        """Cut `child`'s edge after `k` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < k < len(child.key)
        upper = RadixNode(parent, child.key[:k], child.slots[:k], child.last_access)
        upper.lock_ref = child.lock_ref  # the same paths run through both halves
        upper.children[child.key[k]] = child
        parent.children[upper.key[0]] = upper
        child.parent = upper
        child.key = child.key[k:]
        child.slots = child.slots[k:]
        return upper

    # -- references from running sequences -----------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Protect the path root → `node` from eviction (one reference per call)."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self._num_locked += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise RuntimeError("unlock of a prefix-cache node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._num_locked -= len(node.key)
            node = node.parent

    # -- eviction --------------------------------------------------------------------------------------

    def evict(self, num_slots_needed: int) -> int:
        """Drop least-recently-used unlocked leaves until `num_slots_needed` slots went back to the
        allocator's free stack (or nothing evictable is left); returns how many did."""
        start = self.allocator.num_free
        if num_slots_needed <= 0:
            return 0
        heap = [(n.last_access, id(n), n) for n in self._unlocked_leaves()]
        heapq.heapify(heap)
        while heap:
            freed = self.allocator.num_free - start
            if freed >= num_slots_needed:
                break
            _, _, leaf = heapq.heappop(heap)
            want = num_slots_needed - freed
            if len(leaf.key) > want:  # trim the tail only; the rest stays cached
                self.allocator.free(leaf.slots[-want:])
                del leaf.key[-want:], leaf.slots[-want:]
                self._num_cached -= want
                heapq.heappush(heap, (leaf.last_access, id(leaf), leaf))
                continue
            self.allocator.free(leaf.slots)
            self._num_cached -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            leaf.parent = None
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return self.allocator.num_free - start

    def evict_all(self) -> int:
        """Drop every unlocked cached prefix; returns the slots that went back to the free stack."""
        return self.evict(self.allocator.num_slots)

    def _unlocked_leaves(self) -> list[RadixNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.parent is not None and node.lock_ref == 0:
                leaves.append(node)
        return leaves

    def cached_prefixes(self) -> dict[tuple[int, ...], int]:
        """Every cached prefix mapped to the slot of its last token (for tests and debugging)."""
        out: dict[tuple[int, ...], int] = {}
        stack: list[tuple[RadixNode, tuple[int, ...]]] = [(self.root, ())]
        while stack:
            node, prefix = stack.pop()
            for i, slot in enumerate(node.slots):
                out[prefix + tuple(node.key[: i + 1])] = slot  # (a starred subscript needs Python 3.11)
            stack.extend((c, (*prefix, *node.key)) for c in node.children.values())
        return out
