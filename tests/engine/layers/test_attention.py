"""Attention over the KV pool against a few-line dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from engine.layers import Attention, dequantize_int8, quantize_int8
from engine.layers.alibi import alibi_slopes
from engine.worker.forward_context import KVPool, build_forward_context, set_forward_context

H, KV, D = 4, 2, 8
NUM_SLOTS, ROWS, MAX_LEN = 256, 4, 64


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [n, H, D] at positions start.., k/v [L, KV, D] at 0..L-1 -> [n, H, D]; with ALiBi
    `slopes` [H], slope_h * (key position - query position) added to head h's scores."""
    n, length = q.shape[0], k.shape[0]
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) / math.sqrt(D)
    q_pos = torch.arange(start, start + n)[:, None]
    k_pos = torch.arange(length)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    if slopes is not None:
        scores = scores + slopes[:, None, None] * (k_pos - q_pos)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def make_pool(int8: bool) -> KVPool:
    dtype = torch.int8 if int8 else torch.float32
    return KVPool(
        k=[torch.zeros(NUM_SLOTS + 1, KV, D, dtype=dtype)],
        v=[torch.zeros(NUM_SLOTS + 1, KV, D, dtype=dtype)],
        k_scale=[torch.zeros(NUM_SLOTS + 1, KV)] if int8 else None,
        v_scale=[torch.zeros(NUM_SLOTS + 1, KV)] if int8 else None,
    )


def run_steps(
    attn: Attention, pool: KVPool, steps: list[list[tuple[int, int]]], seed: int = 0
) -> tuple[list[torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """steps: per step, (row, num_new) per sequence. Returns each step's output and every row's
    full (q, k, v) history, so the reference can recompute it densely."""
    gen = torch.Generator().manual_seed(seed)
    req_to_token = torch.randint(
        0, NUM_SLOTS, (ROWS, MAX_LEN), dtype=torch.int32, generator=gen
    )  # stale junk
    free = torch.randperm(NUM_SLOTS, generator=gen).tolist()
    lens = [0] * ROWS
    history: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    outputs = []
    for step in steps:
        rows = [r for r, _ in step]
        starts = [lens[r] for r in rows]
        new_lens = [n for _, n in step]
        slots = [free.pop() for _ in range(sum(new_lens))]
        off = 0
        for r, s, n in zip(rows, starts, new_lens, strict=True):
            req_to_token[r, s : s + n] = torch.tensor(slots[off : off + n], dtype=torch.int32)
            lens[r], off = s + n, off + n
        t = sum(new_lens)
        q, k, v = (torch.randn(t, heads * D, generator=gen) for heads in (H, KV, KV))
        ctx = build_forward_context(pool, req_to_token, rows, starts, new_lens, torch.tensor(slots))
        with set_forward_context(ctx):
            outputs.append(attn(q, k, v))
        off = 0
        for r, n in zip(rows, new_lens, strict=True):
            parts = (
                q[off : off + n].view(n, H, D),
                k[off : off + n].view(n, KV, D),
                v[off : off + n].view(n, KV, D),
            )
            old = history.get(r)
            history[r] = (
                parts if old is None else tuple(torch.cat([a, b]) for a, b in zip(old, parts, strict=True))
            )
            off += n
    return outputs, history


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
def test_mixed_steps_match_dense_reference(window: int | None, int8: bool, alibi: bool) -> None:
    slopes = alibi_slopes(H) if alibi else None
    attn = Attention(H, KV, D, scale=D**-0.5, layer_idx=0, sliding_window=window, alibi_slopes=slopes)
    # prefill (one chunked), a mixed step, decode-only steps over 3 sequences, then over one
    # (the single-sequence decode path, with and without the window cutting in).
    steps = [
        [(0, 7), (1, 3)],
        [(1, 9), (2, 12), (0, 1)],
        [(0, 1), (1, 1), (2, 1)],
        [(2, 1), (0, 1), (1, 1)],
        [(1, 1)],
        [(3, 2)],
        [(3, 1)],
    ]
    outputs, history = run_steps(attn, make_pool(int8), steps)
    lens = [0] * ROWS
    tol = 5e-2 if int8 else 1e-5
    for step, out in zip(steps, outputs, strict=True):
        off = 0
        for r, n in step:
            q, k, v = history[r]
            end = lens[r] + n
            expected = reference(q[lens[r] : end], k[:end], v[:end], lens[r], window, slopes)
            actual = out[off : off + n].view(n, H, D)
            assert (actual - expected).norm() / expected.norm() < tol, (step, r)
            lens[r], off = end, off + n


@pytest.mark.parametrize("alibi", [False, True])
def test_batched_decode_equals_per_sequence_path(alibi: bool) -> None:
    slopes = alibi_slopes(H) if alibi else None
    attn = Attention(H, KV, D, scale=0.3, layer_idx=0, sliding_window=4, alibi_slopes=slopes)
    pool = make_pool(False)
    run_steps(attn, pool, [[(0, 6), (1, 2), (2, 9)]], seed=3)  # fills slots 0.. of rows 0-2
    req_to_token = torch.full((ROWS, MAX_LEN), NUM_SLOTS - 1, dtype=torch.int32)
    req_to_token[:3, :10] = torch.randperm(NUM_SLOTS)[:30].view(3, 10).int()
    starts = [5, 1, 8]
    ctx = build_forward_context(
        pool, req_to_token, [0, 1, 2], starts, [1, 1, 1], req_to_token[[0, 1, 2], starts].long()
    )
    q, k, v = torch.randn(3, H * D), torch.randn(3, KV * D), torch.randn(3, KV * D)
    with set_forward_context(ctx):
        batched = attn(q, k, v).view(3, H, D)
        looped = attn._per_sequence(ctx, q.view(3, H, D), k, v)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


def test_prefill_reads_a_lower_precision_pool_back() -> None:
    """A prompt prefilled in one step attends to its keys as the pool holds them (here bf16),
    exactly as when it is prefilled in chunks (which must read the first chunk back)."""
    attn = Attention(H, KV, D, scale=D**-0.5, layer_idx=0)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(10, heads * D, generator=gen) for heads in (H, KV, KV))
    outputs = []
    for chunks in ([10], [6, 4]):
        pool = KVPool(
            k=[torch.zeros(NUM_SLOTS + 1, KV, D, dtype=torch.bfloat16)],
            v=[torch.zeros(NUM_SLOTS + 1, KV, D, dtype=torch.bfloat16)],
        )
        req_to_token = torch.zeros(ROWS, MAX_LEN, dtype=torch.int32)
        req_to_token[0, :10] = torch.arange(20, 30, dtype=torch.int32)
        start, parts = 0, []
        for n in chunks:
            slots = req_to_token[0, start : start + n].long()
            ctx = build_forward_context(pool, req_to_token, [0], [start], [n], slots)
            with set_forward_context(ctx):
                parts.append(attn(q[start : start + n], k[start : start + n], v[start : start + n]))
            start += n
        outputs.append(torch.cat(parts))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_int8_round_trip() -> None:
    x = torch.randn(5, KV, D) * torch.tensor([0.01, 30.0]).view(1, KV, 1)
    x[0, 0] = 0.0
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (5, KV)
    assert q.abs().max() == 127
    back = dequantize_int8(q, scale, torch.float32)
    assert torch.all((back - x).abs() <= scale.unsqueeze(-1) / 2 + 1e-7)
    assert torch.equal(back[0, 0], torch.zeros(D))


def test_rejects_heads_not_divisible() -> None:
    with pytest.raises(ValueError, match="multiple"):
        Attention(6, 4, D, scale=1.0, layer_idx=0)
