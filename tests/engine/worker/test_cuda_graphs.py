"""The buckets CUDA graphs are captured for: batch sizes (decode) and token counts (packed steps).

The graphs themselves run in test_gpu.py.
"""

from __future__ import annotations

import pytest

from engine.worker.cuda_graphs import batch_buckets, token_buckets


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


@pytest.mark.parametrize("max_tokens", [1, 16, 100, 1024, 2048, 3000])
def test_every_token_count_has_a_bucket_with_bounded_padding(max_tokens: int) -> None:
    buckets = token_buckets(max_tokens)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_tokens
    for n in range(1, max_tokens + 1):
        bucket = next(b for b in buckets if b >= n)
        # at most 2x below 128 tokens (16 at least), at most 128 / 256 padded tokens above
        assert bucket - n < (max(n, 16) if n < 128 else 128 if n <= 1024 else 256)


def test_token_buckets_of_the_default_cap() -> None:
    assert token_buckets(2048) == [16, 32, 64, *range(128, 1024, 128), *range(1024, 2049, 256)]
