"""Bitmask layout and its application to logits (the torch path, the kernel's reference)."""

from __future__ import annotations

import pytest
import torch

from engine.grammar.bitmask import (
    allocate_token_bitmask,
    apply_token_bitmask,
    apply_token_bitmask_torch,
    unpack_bitmask,
)


def naive(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Bit by bit, in Python: token j of row rows[k] stays iff word j // 32 of mask k has bit j % 32."""
    out = logits.clone()
    for k, row in enumerate(rows):
        for j in range(logits.shape[1]):
            word = j // 32
            keep = word < bitmask.shape[1] and (int(bitmask[k, word]) >> (j % 32)) & 1
            if not keep:
                out[row, j] = float("-inf")
    return out


def random_bitmask(rows: int, words: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, (rows, words), generator=gen, dtype=torch.int64).to(torch.int32)


def test_allocate_allows_everything() -> None:
    bitmask = allocate_token_bitmask(3, 100)
    assert bitmask.shape == (3, 4) and bitmask.dtype == torch.int32
    assert unpack_bitmask(bitmask, 100).all()
    assert not unpack_bitmask(bitmask, 130)[:, 128:].any()  # ids past the mask's words: not allowed


@pytest.mark.parametrize(
    ("vocab", "words", "rows"),
    [
        (100, 4, [0, 1, 2]),  # one mask per row; bits 100..127 ignored
        (100, 3, [2, 0]),  # the mask covers 96 ids: the 4 past it are masked; rows out of order, one row free
        (64, 2, [1]),
    ],
)
def test_torch_path_matches_the_bits(vocab: int, words: int, rows: list[int]) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=gen)
    bitmask = random_bitmask(len(rows), words, seed=words)
    got = logits.clone()
    apply_token_bitmask_torch(got, bitmask, torch.tensor(rows))
    assert torch.equal(got, naive(logits, bitmask, rows))
    free = [r for r in range(3) if r not in rows]
    assert torch.equal(got[free], logits[free])  # rows without a mask are untouched


def test_rows_default_to_one_mask_per_row_and_other_dtypes() -> None:
    logits = torch.randn(2, 70).to(torch.bfloat16)
    bitmask = random_bitmask(2, 3, seed=1)
    got = logits.clone()
    apply_token_bitmask(got, bitmask)
    assert torch.equal(got, naive(logits, bitmask, [0, 1]))
    with pytest.raises(ValueError, match="pass rows"):
        apply_token_bitmask(got, bitmask[:1])
