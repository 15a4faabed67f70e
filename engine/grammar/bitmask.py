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


# Masks of this many bytes of logits at a time on the CPU: the temporary stays in the cache.
_CHUNK_BYTES = 1 << 20
_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8] of `dtype`: for each byte value, its bits lowest first, as bool (allowed) or,
    for a float dtype, as what a logit gets added (0 where allowed, -inf where not)."""
    table = _TABLES.get((device, dtype))
    if table is None:
        values = torch.arange(256, dtype=torch.int32).unsqueeze(1)
        bits = ((values >> torch.arange(8, dtype=torch.int32)) & 1).bool()
        if dtype != torch.bool:
            bits = torch.zeros(256, 8, dtype=dtype).masked_fill_(~bits, float("-inf"))
        table = _TABLES[device, dtype] = bits.to(device)
    return table


def _expand(bitmask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[K, W] int32 -> [K, 32 * W] through the byte table: an int32 word's bytes, lowest first
    (little-endian, as every host torch runs on), hold its bits 0-7, 8-15, 16-23, 24-31."""
    as_bytes = bitmask.contiguous().view(torch.uint8).view(-1).long()  # [K * 4 * W]
    return _byte_table(bitmask.device, dtype).index_select(0, as_bytes).view(bitmask.shape[0], -1)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[K, W] int32 -> [K, vocab_size] bool (True: allowed); ids at or past 32 * W: False."""
    bits = _expand(bitmask, torch.bool)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=False)


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[k]] = -inf where `bitmask[k]` does not allow the token.

    Adds 0 or -inf from a byte table, a few rows at a time: additions vectorise where a
    boolean masked_fill does not, and x + 0 is x."""
    num_masks, vocab_size = bitmask.shape[0], logits.shape[1]
    if num_masks == 0:
        return
    index = rows.long()
    covered = min(vocab_size, 32 * bitmask.shape[1])
    if covered < vocab_size:  # a padded vocabulary past what the mask covers
        logits[:, covered:].index_fill_(0, index, float("-inf"))
    step = max(1, _CHUNK_BYTES // (32 * bitmask.shape[1] * logits.element_size()))
    for start in range(0, num_masks, step):
        add = _expand(bitmask[start : start + step], logits.dtype)[:, :covered]
        logits[:, :covered].index_add_(0, index[start : start + step], add)


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
