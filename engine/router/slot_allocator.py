"""Token-granular KV bookkeeping on the CPU: which pool slots and `req_to_token` rows are free.

`KVSlotAllocator` hands out indices into the KV pool (`[num_slots + 1, kv_heads, head_dim]` per
layer on the worker; the extra last slot, index `num_slots`, is the dummy that padded entries
point at and is never handed out). A slot may be held by several owners at once: siblings of an
`n > 1` request sharing the prompt, and later the radix prefix cache. Each owner holds one
reference; a slot goes back to the free stack when its last reference is dropped.

`ReqRowAllocator` hands out rows of `req_to_token[max_num_seqs, max_model_len]`: one per
running sequence.

Both are plain CPU state with no device tensors; the worker only learns the resulting indices.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class KVSlotAllocator:
    """A stack of free slot indices with a reference count per slot.

    Invariant: a slot is on the free stack exactly when its reference count is 0, so
    `num_free + (number of slots with refcount > 0) == num_slots`.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        self.num_slots = num_slots
        # _free_stack[:_num_free] are the free slots; the top of the stack is the end. Popping
        # from the end hands out low indices first, which keeps the used part of the pool compact.
        self._free_stack = np.arange(num_slots - 1, -1, -1, dtype=np.int64)
        self._num_free = num_slots
        self._refcounts = np.zeros(num_slots, dtype=np.int32)

    @property
    def dummy_slot(self) -> int:
        """The pool's extra slot that padded entries point at; never allocated."""
        return self.num_slots

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_slots - self._num_free

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, 0..1."""
        return self.num_used / self.num_slots

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh slots, each with one reference; None (and nothing taken) when fewer are free.

        Returning None rather than raising: running out is an expected outcome the scheduler
        answers with waiting or preemption, not an error.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self._num_free:
            return None
        if n == 0:
            return []
        start = self._num_free - n
        taken = self._free_stack[start : self._num_free]
        self._refcounts[taken] = 1
        self._num_free = start
        return taken[::-1].tolist()

    def incref(self, slots: Iterable[int]) -> None:
        """Add one reference to each slot (a new owner); every slot must already be held."""
        idx = self._as_index(slots)
        if idx.size == 0:
            return
        if (self._refcounts[idx] <= 0).any():
            raise RuntimeError("incref of a free KV slot")
        np.add.at(self._refcounts, idx, 1)

    def free(self, slots: Iterable[int]) -> None:
        """Drop one reference per listed slot; slots reaching zero return to the free stack.

        Freeing a slot that holds no reference is a bookkeeping bug: raises RuntimeError and
        leaves the allocator unchanged.
        """
        idx = self._as_index(slots)
        if idx.size == 0:
            return
        uniq, counts = np.unique(idx, return_counts=True)
        if (self._refcounts[uniq] < counts).any():
            raise RuntimeError("free of a KV slot that holds no reference (double free)")
        self._refcounts[uniq] -= counts.astype(np.int32)
        released = uniq[self._refcounts[uniq] == 0]
        end = self._num_free + released.size
        self._free_stack[self._num_free : end] = released
        self._num_free = end

    def refcount(self, slot: int) -> int:
        return int(self._refcounts[slot])

    def _as_index(self, slots: Iterable[int]) -> np.ndarray:
        idx = np.asarray(slots if isinstance(slots, list | tuple | np.ndarray) else list(slots), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_slots):
            raise IndexError(f"KV slot out of range [0, {self.num_slots})")
        return idx


class ReqRowAllocator:
    """Free rows of `req_to_token`; one per running sequence."""

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        self._free_rows = list(range(max_rows - 1, -1, -1))  # pop() hands out row 0 first
        self._is_free = [True] * max_rows

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    @property
    def num_used(self) -> int:
        return self.max_rows - len(self._free_rows)

    def allocate(self) -> int | None:
        """A free row, or None when every row is taken."""
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def free(self, row: int) -> None:
        if not 0 <= row < self.max_rows:
            raise IndexError(f"row {row} out of range [0, {self.max_rows})")
        if self._is_free[row]:
            raise RuntimeError(f"row {row} freed twice")
        self._is_free[row] = True
        self._free_rows.append(row)
