"""The radix prefix cache against a brute-force model: a dict of every cached prefix → slot."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.router.prefix_cache import RadixNode, RadixPrefixCache
from engine.router.slot_allocator import KVSlotAllocator

NUM_SLOTS = 48


@dataclass
class Holder:
    """A running sequence: its tokens, its own references and the node it locked."""

    tokens: list[int]
    slots: list[int]
    matched: int
    node: RadixNode


def _longest(model: dict[tuple[int, ...], int], tokens: list[int]) -> int:
    m = 0
    while m < len(tokens) and tuple(tokens[: m + 1]) in model:
        m += 1
    return m


class Harness:
    def __init__(self) -> None:
        self.alloc = KVSlotAllocator(NUM_SLOTS)
        self.cache = RadixPrefixCache(self.alloc)
        self.model: dict[tuple[int, ...], int] = {}
        self.holders: list[Holder] = []

    def start(self, tokens: list[int]) -> None:
        m = _longest(self.model, tokens)
        slots, node = self.cache.match_prefix(tokens)
        assert slots == [self.model[tuple(tokens[: i + 1])] for i in range(m)]  # true and longest
        self.cache.lock(node)
        self.alloc.incref(slots)
        need = len(tokens) - m
        if self.alloc.num_free < need:
            self.cache.evict(need - self.alloc.num_free)
            self.sync_after_evict()
        own = self.alloc.allocate(need)
        if own is None:  # the pool is full of references held by others: give up
            self.cache.unlock(node)
            self.alloc.free(slots)
            return
        self.holders.append(Holder(tokens, slots + own, m, node))

    def finish(self, i: int, insert: bool) -> None:
        h = self.holders.pop(i % len(self.holders))
        if insert:
            assert self.cache.insert(h.tokens, h.slots) == _longest(self.model, h.tokens)
            for j in range(len(h.tokens)):
                self.model.setdefault(tuple(h.tokens[: j + 1]), h.slots[j])
        self.cache.unlock(h.node)
        self.alloc.free(h.slots)

    def evict(self, n: int) -> None:
        free_before, cached_before = self.alloc.num_free, self.cache.num_cached_tokens
        evictable = self.cache.num_evictable_tokens
        freed = self.cache.evict(n)
        assert freed == self.alloc.num_free - free_before
        # Every holder's references are its own: the tree frees exactly what it dropped.
        assert freed == cached_before - self.cache.num_cached_tokens
        assert freed == min(n, evictable) if n > 0 else freed == 0
        self.sync_after_evict()

    def sync_after_evict(self) -> None:
        now = self.cache.cached_prefixes()
        for prefix, slot in now.items():  # eviction only removes, never changes a mapping
            assert self.model[prefix] == slot
        for h in self.holders:  # locked prefixes survive
            for j in range(h.matched):
                assert tuple(h.tokens[: j + 1]) in now
        self.model = now

    def check(self) -> None:
        assert self.cache.cached_prefixes() == self.model
        assert self.cache.num_cached_tokens == len(self.model)
        locked = {tuple(h.tokens[: j + 1]) for h in self.holders for j in range(h.matched)}
        assert self.cache.num_evictable_tokens == len(self.model) - len(locked)
        expected = [0] * NUM_SLOTS
        for slot in self.model.values():
            expected[slot] += 1
        for h in self.holders:
            for slot in h.slots:
                expected[slot] += 1
        assert [self.alloc.refcount(s) for s in range(NUM_SLOTS)] == expected
        assert self.alloc.num_free == sum(1 for c in expected if c == 0)


tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=10)
op_st = st.one_of(
    st.tuples(st.just("start"), tokens_st),
    st.tuples(st.just("finish"), st.integers(0, 20)),
    st.tuples(st.just("abort"), st.integers(0, 20)),
    st.tuples(st.just("evict"), st.integers(0, 20)),
    st.tuples(st.just("match"), tokens_st),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=60))
def test_random_operations_match_brute_force_model(ops: list[tuple[str, object]]) -> None:
    h = Harness()
    for op, arg in ops:
        if op == "start":
            h.start(arg)  # type: ignore[arg-type]
        elif op in ("finish", "abort") and h.holders:
            h.finish(arg, insert=op == "finish")  # type: ignore[arg-type]
        elif op == "evict":
            h.evict(arg)  # type: ignore[arg-type]
        elif op == "match":
            tokens: list[int] = arg  # type: ignore[assignment]
            slots, _node = h.cache.match_prefix(tokens)
            m = _longest(h.model, tokens)
            assert slots == [h.model[tuple(tokens[: i + 1])] for i in range(m)]
        h.check()
    while h.holders:
        h.finish(0, insert=True)
        h.check()
    h.cache.evict_all()
    assert h.cache.num_cached_tokens == 0 and not h.cache.root.children
    assert h.alloc.num_free == NUM_SLOTS  # nothing leaked


def _cache_with(*seqs: list[int]) -> tuple[KVSlotAllocator, RadixPrefixCache]:
    alloc = KVSlotAllocator(32)
    cache = RadixPrefixCache(alloc)
    for tokens in seqs:
        slots = alloc.allocate(len(tokens))
        assert slots is not None
        cache.insert(tokens, slots)
        alloc.free(slots)
    return alloc, cache


def test_evicts_least_recently_used_leaf_first() -> None:
    alloc, cache = _cache_with([1, 2, 3], [1, 5, 6], [7, 8])
    cache.match_prefix([1, 2, 3])  # now the most recent
    cache.match_prefix([7, 8])
    assert cache.evict(2) == 2
    assert set(cache.cached_prefixes()) == {(1,), (1, 2), (1, 2, 3), (7,), (7, 8)}
    assert cache.evict(1) == 1  # trims the tail of the least recent leaf, not all of it
    assert set(cache.cached_prefixes()) == {(1,), (1, 2), (7,), (7, 8)}
    assert alloc.num_free == 32 - 4


def test_locked_path_survives_eviction_and_split_keeps_locks() -> None:
    alloc, cache = _cache_with([1, 2, 3, 4])
    slots, node = cache.match_prefix([1, 2, 9])  # splits the edge after [1, 2]
    assert len(slots) == 2
    cache.lock(node)
    assert cache.num_evictable_tokens == 2
    assert cache.evict(10) == 2
    assert set(cache.cached_prefixes()) == {(1,), (1, 2)}
    _, deeper = cache.match_prefix([1])  # splits a locked edge: both halves stay locked
    assert cache.num_evictable_tokens == 0 and cache.evict(10) == 0
    cache.unlock(node)
    with pytest.raises(RuntimeError):
        cache.unlock(deeper)
    assert cache.evict_all() == 2 and alloc.num_free == 32


def test_insert_reports_the_cached_part_and_keeps_its_own_slots() -> None:
    alloc, cache = _cache_with([4, 5, 6])
    old = cache.match_prefix([4, 5, 6])[0]
    mine = alloc.allocate(5)
    assert mine is not None
    assert cache.insert([4, 5, 6, 7, 8], mine) == 3
    assert cache.match_prefix([4, 5, 6, 7, 8])[0] == old + mine[3:]
    alloc.free(mine)
    assert alloc.refcount(mine[0]) == 0 and alloc.refcount(mine[3]) == 1
    with pytest.raises(ValueError):
        cache.insert([1, 2], [0])
