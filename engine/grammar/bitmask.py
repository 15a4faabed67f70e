"""Next-token bitmasks: allocated on the host, applied to the logits on their device.

A bitmask is [rows, ceil(vocab / 32)] int32: bit j % 32 of word j // 32 allows token j. The
matchers fill it on the host (`engine/grammar/matcher.py`); the sampler applies it to the rows
of the logits that have a grammar, after its other logit processing and before drawing:
`apply_token_bitmask(logits, bitmask, rows)` sets -inf wherever a token is not allowed. A
vocabulary padded past the tokenizer's (the logits wider than the mask covers) is masked
there too. On CUDA with the Triton backend it is one kernel (engine/kernels/token_bitmask.py),
elsewhere the torch code below, its reference.
"""

from __future__ import annotations

import torch

from engine.layers.backend import use_triton


def allocate_token_bitmask(rows: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """[rows, ceil(vocab_size / 32)] int32 on the host, every token allowed. `pin_memory` for
    one that is copied to a GPU without waiting (a new one per step, so that a copy still
    queued never reads a row the next step rewrites)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32, pin_memory=pin_memory)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[K, W] int32 -> [K, vocab_size] bool (True: allowed); ids at or past 32 * W: False."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)  # [K, 32 * W]
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=False)


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[k]] = -inf where `bitmask[k]` does not allow the token."""
    if bitmask.shape[0] == 0:
        return
    allowed = unpack_bitmask(bitmask, logits.shape[1])
    index = rows.long()
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(~allowed, float("-inf")))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """In place: for each k, row `rows[k]` of `logits` [N, V] gets -inf at the tokens
    `bitmask[k]` ([K, W] int32, on the logits' device) does not allow; `rows` None: row k for
    mask k (K == N). `rows` holds distinct row indices, on the logits' device."""
    if rows is None:
        if bitmask.shape[0] != logits.shape[0]:
            raise ValueError(f"{bitmask.shape[0]} bitmask rows for {logits.shape[0]} logits rows: pass rows")
        rows = torch.arange(logits.shape[0], device=logits.device)
    if logits.is_cuda and use_triton():
        from engine.kernels.token_bitmask import apply_token_bitmask as kernel

        kernel(logits, bitmask, rows)
    else:
        apply_token_bitmask_torch(logits, bitmask, rows)
