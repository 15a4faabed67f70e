"""token_bitmask against engine.grammar.bitmask.apply_token_bitmask_torch."""

from __future__ import annotations

import pytest
import torch

from engine.grammar.bitmask import apply_token_bitmask_torch
from engine.kernels.token_bitmask import apply_token_bitmask


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check(num_rows: int, vocab: int, words: int, rows: list[int], dtype: torch.dtype) -> None:
    device = _device()
    gen = torch.Generator().manual_seed(vocab + words)
    logits = (3 * torch.randn(num_rows, vocab, generator=gen)).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31, (len(rows), words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[0, 0] = 0  # a word that allows nothing
    want = logits.clone()
    apply_token_bitmask_torch(want, bitmask, torch.tensor(rows))
    got = logits.to(device)
    apply_token_bitmask(got, bitmask.to(device), torch.tensor(rows, device=device))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_rows", "vocab", "words", "rows"),
    [
        (4, 100, 4, [0, 1, 2, 3]),  # bits past the vocabulary ignored
        (5, 5000, 157, [3, 0, 4]),  # two column blocks; rows out of order, two rows free
        (3, 5000, 100, [1, 2]),  # a padded vocabulary: the 1 800 ids past the mask's words masked
    ],
)
def test_kernel_matches_torch(num_rows: int, vocab: int, words: int, rows: list[int], dtype: torch.dtype) -> None:
    _check(num_rows, vocab, words, rows, dtype)


def test_kernel_checks_its_inputs() -> None:
    device = _device()
    logits = torch.zeros(2, 64, device=device)
    bitmask = torch.zeros(2, 2, dtype=torch.int32, device=device)
    rows = torch.arange(2, device=device)
    with pytest.raises(ValueError, match="logits"):
        apply_token_bitmask(logits.to(torch.int32), bitmask, rows)
    with pytest.raises(ValueError, match="bitmask"):
        apply_token_bitmask(logits, bitmask.to(torch.int64), rows)
    with pytest.raises(ValueError, match="rows"):
        apply_token_bitmask(logits, bitmask, rows[:1])
    apply_token_bitmask(logits, bitmask[:0], rows[:0])  # nothing to mask
    assert (logits == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 64, 512])
def test_kernel_gpu_at_the_8b_vocabulary(rows: int) -> None:
    # the 8B-shaped model's logits over the default model's tokenizer: masks of 1 536 words
    _check(rows + 3, 128256, 1536, list(range(rows + 3))[3:], torch.float32)
