from __future__ import annotations

import random

import pytest

from engine.router.slot_allocator import KVSlotAllocator, ReqRowAllocator


def test_allocate_hands_out_distinct_slots_and_counts_them() -> None:
    alloc = KVSlotAllocator(10)
    a = alloc.allocate(4)
    b = alloc.allocate(6)
    assert a is not None and b is not None
    assert sorted(a + b) == list(range(10))
    assert alloc.num_free == 0 and alloc.num_used == 10 and alloc.usage == 1.0
    assert alloc.dummy_slot == 10  # the extra pool slot, never handed out


def test_allocate_more_than_free_returns_none_and_takes_nothing() -> None:
    alloc = KVSlotAllocator(8)
    assert alloc.allocate(5) is not None
    assert alloc.allocate(4) is None
    assert alloc.num_free == 3
    assert alloc.allocate(0) == []
    with pytest.raises(ValueError):
        alloc.allocate(-1)


def test_free_returns_slots_for_reuse() -> None:
    alloc = KVSlotAllocator(6)
    a = alloc.allocate(6)
    assert a is not None
    alloc.free(a[:2])
    assert alloc.num_free == 2 and alloc.usage == pytest.approx(4 / 6)
    again = alloc.allocate(2)
    assert again is not None and sorted(again) == sorted(a[:2])


def test_double_free_raises_and_changes_nothing() -> None:
    alloc = KVSlotAllocator(4)
    a = alloc.allocate(3)
    assert a is not None
    alloc.free([a[0]])
    with pytest.raises(RuntimeError):
        alloc.free([a[1], a[0]])  # a[1] is fine, a[0] is already free
    assert alloc.num_free == 2 and alloc.refcount(a[1]) == 1
    with pytest.raises(RuntimeError):
        alloc.free([a[1], a[1]])  # two references dropped, only one held
    assert alloc.refcount(a[1]) == 1


def test_refcounted_slot_returns_only_after_last_reference() -> None:
    alloc = KVSlotAllocator(4)
    a = alloc.allocate(2)
    assert a is not None
    alloc.incref(a)
    alloc.incref([a[0]])
    assert [alloc.refcount(s) for s in a] == [3, 2]
    alloc.free(a)
    assert alloc.num_free == 2
    alloc.free([a[0], a[1]])
    assert alloc.num_free == 3 and alloc.refcount(a[0]) == 1
    alloc.free([a[0]])
    assert alloc.num_free == 4


def test_free_of_a_slot_listed_twice_drops_two_references() -> None:
    alloc = KVSlotAllocator(3)
    a = alloc.allocate(1)
    assert a is not None
    alloc.incref(a)
    alloc.free([a[0], a[0]])
    assert alloc.num_free == 3


def test_incref_of_a_free_slot_and_out_of_range_slots_raise() -> None:
    alloc = KVSlotAllocator(4)
    with pytest.raises(RuntimeError):
        alloc.incref([0])
    with pytest.raises(IndexError):
        alloc.free([4])
    with pytest.raises(IndexError):
        alloc.incref([-1])


def test_random_allocate_free_leaks_nothing() -> None:
    rng = random.Random(0)
    alloc = KVSlotAllocator(500)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            slots = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.3:  # a second owner that lets go first
                alloc.incref(slots)
                alloc.free(slots)
            alloc.free(slots)
        else:
            got = alloc.allocate(rng.randint(1, 40))
            if got is not None:
                held.append(got)
        in_use = [s for slots in held for s in slots]
        assert len(in_use) == len(set(in_use)) == alloc.num_used
    for slots in held:
        alloc.free(slots)
    assert alloc.num_free == 500
    everything = alloc.allocate(500)
    assert everything is not None and sorted(everything) == list(range(500))


def test_allocating_thousands_of_slots_round_trips() -> None:
    alloc = KVSlotAllocator(1 << 16)
    for _ in range(200):
        slots = alloc.allocate(8000)
        assert slots is not None and len(set(slots)) == 8000
        alloc.free(slots)
    assert alloc.num_free == 1 << 16


def test_rows_allocate_free_and_double_free() -> None:
    rows = ReqRowAllocator(3)
    got = [rows.allocate() for _ in range(3)]
    assert got == [0, 1, 2] and rows.allocate() is None
    assert rows.num_free == 0 and rows.num_used == 3
    rows.free(1)
    assert rows.allocate() == 1
    rows.free(2)
    with pytest.raises(RuntimeError):
        rows.free(2)
    with pytest.raises(IndexError):
        rows.free(3)
    assert rows.num_free == 1
