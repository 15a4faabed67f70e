"""Grammar masks applied to logits: logits[rows[k], j] = -inf where bit j of bitmask[k] is 0.

bitmask [K, W] int32: bit j % 32 of word j // 32 allows token j. Columns at or past 32 * W
(a vocabulary padded past what the mask covers) are masked too; bits past the logits' width
are ignored. Only the masked entries are written: the logits are not read.
`engine.grammar.bitmask.apply_token_bitmask_torch` is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["apply_token_bitmask"]

_BLOCK = 4096


@triton.jit
def _token_bitmask_kernel(logits_ptr, stride_logits, bitmask_ptr, stride_bitmask, rows_ptr, vocab, words,
                          BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + k).to(tl.int64)
    word_idx = cols // 32
    in_vocab = cols < vocab
    word = tl.load(bitmask_ptr + k * stride_bitmask + word_idx, mask=in_vocab & (word_idx < words), other=0)
    allowed = (word >> (cols % 32)) & 1
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_logits + cols, neg_inf, mask=in_vocab & (allowed == 0))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: for each k, row `rows[k]` of `logits` ([N, V], float32 / bfloat16 / float16,
    contiguous last dim) gets -inf at the tokens `bitmask[k]` ([K, W] int32, contiguous)
    does not allow. `rows` ([K] int32 / int64) must hold distinct valid row indices; all on
    one device."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16) or logits.stride(-1) != 1:
        raise ValueError(f"logits must be float32/bfloat16/float16 [N, V] with a contiguous last dim, got "
                         f"{logits.dtype} {list(logits.shape)} strides {logits.stride()}")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32 or not bitmask.is_contiguous():
        raise ValueError(f"bitmask must be a contiguous int32 [K, W] tensor, got {bitmask.dtype} {list(bitmask.shape)}")
    if rows.shape != (bitmask.shape[0],) or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be int32/int64 [{bitmask.shape[0]}], got {rows.dtype} {list(rows.shape)}")
    if not logits.device == bitmask.device == rows.device:
        raise ValueError(f"logits, bitmask and rows must share a device, got {logits.device}, {bitmask.device}, "
                         f"{rows.device}")
    num_masks, vocab = bitmask.shape[0], logits.shape[1]
    if num_masks and vocab:
        grid = (num_masks, triton.cdiv(vocab, _BLOCK))
        _token_bitmask_kernel[grid](
            logits, logits.stride(0), bitmask, bitmask.stride(0), rows, vocab, bitmask.shape[1], BLOCK=_BLOCK,
        )
