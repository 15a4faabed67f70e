"""The batch-size buckets CUDA graphs are captured for (the graphs themselves: test_gpu.py)."""

from __future__ import annotations

import pytest

from engine.cuda_graphs import batch_buckets


@pytest.mark.parametrize("max_batch", [1, 3, 8, 16, 40, 256])
def test_every_batch_size_has_the_smallest_bucket_that_holds_it(max_batch: int) -> None:
    buckets = batch_buckets(max_batch)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
    for n in range(1, max_batch + 1):
        bucket = next(b for b in buckets if b >= n)
        # at most 16 padded rows, and at most twice the batch below 16
        assert bucket - n < 16 and (n >= 8 or bucket < 2 * n)


def test_buckets_of_the_default_cap() -> None:
    assert batch_buckets(256)[:6] == [1, 2, 4, 8, 16, 32] and len(batch_buckets(256)) == 20
