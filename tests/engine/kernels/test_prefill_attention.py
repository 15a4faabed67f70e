"""Packed prefill attention kernel against a few-line torch reference over the same pool.

Without CUDA these run under the Triton interpreter (conftest) at tiny shapes, where the
launcher picks 16-row tiles, so several query and key blocks per sequence are covered.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.kernels.prefill_attention import (
    max_prefill_tiles,
    prefill_attention,
    prefill_block_m,
    prefill_tiles,
)
from engine.layers.alibi import alibi_slopes
from tests.engine.kernels.pools import NAN, PoisonedPool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Case(PoisonedPool):
    """Sequences given as (cached prefix length, new length); slots scattered at random, unused
    slots poisoned with NaN, unused req_to_token entries (and, with a window, entries of keys
    that no query of the sequence may see) pointing at poisoned slots."""

    def __init__(
        self,
        seqs: list[tuple[int, int]],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        int8: bool = False,
        window: int | None = None,
        seed: int = 0,
        alibi: bool = False,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        seq_lens = [s + n for s, n in seqs]
        # Keys before the first query's window are never seen by the sequence.
        unseen = [0 if window is None else max(0, start - window + 1) for start, _ in seqs]
        super().__init__(gen, seq_lens, unseen, num_kv_heads, head_dim, dtype, int8)
        num_tokens = sum(n for _, n in seqs)
        self.q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
        self.start_pos = torch.tensor([s for s, _ in seqs], dtype=torch.int64)
        self.cu_new_lens = torch.tensor([0] + [n for _, n in seqs], dtype=torch.int64).cumsum(0)
        self.seqs = seqs
        self.scale = 1.0 / math.sqrt(head_dim)
        self.window = window
        self.alibi_slopes = alibi_slopes(num_heads) if alibi else None  # BLOOM's, of every head

    def run(self, **kwargs: object) -> torch.Tensor:
        out = torch.full_like(self.q, NAN)  # poisoned: an unwritten element fails the test
        result = prefill_attention(
            self.q,
            self.k_pool,
            self.v_pool,
            self.req_to_token,
            self.req_indices,
            self.start_pos,
            self.cu_new_lens,
            self.scale,
            out,
            sliding_window=self.window,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            alibi_slopes=self.alibi_slopes,
            **kwargs,  # type: ignore[arg-type]
        )
        assert result is out
        return out

    def reference(self) -> torch.Tensor:
        """Gather each sequence's keys, repeat kv heads, masked softmax in float32 (with ALiBi,
        slope_h * (key position - query position) added to head h's scores)."""
        group = self.q.shape[1] // self.k_pool.shape[1]
        outs = []
        offset = 0
        for i, (start, num_new) in enumerate(self.seqs):
            length = start + num_new
            first = 0 if self.window is None else max(0, start - self.window + 1)
            slots = self.req_to_token[self.req_indices[i], first:length].long()
            k, v = self.k_pool[slots].float(), self.v_pool[slots].float()  # [L, KV, D]
            if self.k_scale is not None and self.v_scale is not None:
                k = k * self.k_scale[slots].float()[..., None]
                v = v * self.v_scale[slots].float()[..., None]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            q = self.q[offset : offset + num_new].float()
            offset += num_new
            scores = torch.einsum("nhd,lhd->hnl", q, k) * self.scale
            q_pos = torch.arange(start, length, device=q.device)[:, None]
            k_pos = torch.arange(first, length, device=q.device)[None, :]
            allowed = k_pos <= q_pos
            if self.window is not None:
                allowed &= k_pos > q_pos - self.window
            if self.alibi_slopes is not None:
                scores = scores + self.alibi_slopes.float()[:, None, None] * (k_pos - q_pos)
            scores = scores.masked_fill(~allowed, float("-inf"))
            outs.append(torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v))
        return torch.cat(outs).to(self.q.dtype)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


# Fresh prompts, cached prefixes, single tokens (decode rows inside a prefill step), and
# lengths that end inside and on the edges of 16-row tiles.
RAGGED = [(0, 37), (20, 5), (0, 1), (33, 18), (7, 1), (16, 16)]


@pytest.mark.parametrize(
    ("group", "head_dim", "dtype"),
    [
        (1, 64, torch.float32),
        (4, 64, torch.float32),
        (8, 64, torch.float16),
        (2, 128, torch.float32),
    ],
)
def test_matches_reference_on_ragged_batch(group: int, head_dim: int, dtype: torch.dtype) -> None:
    case = Case(RAGGED, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype).to(DEVICE)
    torch.testing.assert_close(case.run(max_new_len=37), case.reference(), **tolerance(dtype))


@pytest.mark.parametrize("int8", [False, True])
def test_multi_query_one_kv_head_serves_every_head(int8: bool) -> None:
    # GPTBigCode: all 6 query heads read the one kv head
    case = Case(RAGGED, num_heads=6, num_kv_heads=1, head_dim=64, dtype=torch.float32, int8=int8).to(DEVICE)
    torch.testing.assert_close(case.run(max_new_len=37), case.reference(), **tolerance(torch.float32))


def test_sliding_window_excludes_old_keys() -> None:
    case = Case(
        [(0, 40), (30, 9), (3, 20), (50, 1)],
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        dtype=torch.float32,
        window=12,
    ).to(DEVICE)
    torch.testing.assert_close(case.run(max_new_len=40), case.reference(), **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_pool_dequantized_with_scales(dtype: torch.dtype) -> None:
    # int8 values and scales dequantize in float32; the dots run in the queries' precision
    # (bf16 only on the GPU: the CPU interpreter's bf16 dots are wrong).
    case = Case([(0, 21), (25, 12)], num_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype, int8=True)
    case.to(DEVICE)
    torch.testing.assert_close(case.run(max_new_len=21), case.reference(), **tolerance(dtype))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "int8", "dtype"),
    [
        (4, 4, False, torch.float32),
        (6, 6, False, torch.float32),  # BLOOM's slopes of a head count that is not a power of two
        (6, 2, True, torch.float32),
        (12, 12, True, torch.float16),
        (8, 8, False, torch.float16),
    ],
)
def test_alibi_matches_reference(heads: int, kv_heads: int, int8: bool, dtype: torch.dtype) -> None:
    case = Case(RAGGED, num_heads=heads, num_kv_heads=kv_heads, head_dim=32, dtype=dtype, int8=int8, alibi=True)
    case.to(DEVICE)
    reference = case.reference()
    torch.testing.assert_close(case.run(max_new_len=37), reference, **tolerance(dtype))
    case.alibi_slopes = None  # the bias matters at these lengths: without it the output differs
    assert (case.reference().float() - reference.float()).abs().max() > 0.1


@pytest.mark.parametrize("int8", [False, True])
def test_alibi_through_the_tile_table(int8: bool) -> None:
    seqs = [*RAGGED, (9, 0)]
    case = Case(seqs, num_heads=6, num_kv_heads=6, head_dim=32, dtype=torch.float32, int8=int8, alibi=True)
    case.to(DEVICE)
    num_tokens = sum(n for _, n in seqs)
    tiles = tile_table(case, max_prefill_tiles(num_tokens + 20, len(seqs), prefill_block_m(torch.device(DEVICE))))
    torch.testing.assert_close(case.run(tiles=tiles), case.reference(), **tolerance(torch.float32))


def test_without_max_new_len_hint_uses_num_tokens() -> None:
    case = Case([(3, 6), (0, 19)], num_heads=2, num_kv_heads=2, head_dim=64, dtype=torch.float32).to(DEVICE)
    torch.testing.assert_close(case.run(), case.reference(), **tolerance(torch.float32))


def tile_table(case: Case, num_tiles: int) -> torch.Tensor:
    block_m = prefill_block_m(torch.device(DEVICE))
    table = np.zeros((2, num_tiles), dtype=np.int64)
    prefill_tiles(np.array([n for _, n in case.seqs]), block_m, table)
    return torch.from_numpy(table).to(DEVICE)


@pytest.mark.parametrize("int8", [False, True])
def test_tile_table_launch_matches_reference(int8: bool) -> None:
    # The grid a CUDA graph captures: one program per table entry, the table longer than the
    # step needs (the unused entries do nothing), padding sequences with no new tokens.
    seqs = [*RAGGED, (9, 0), (0, 0)]
    case = Case(seqs, num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32, int8=int8).to(DEVICE)
    num_tokens = sum(n for _, n in seqs)
    block_m = prefill_block_m(torch.device(DEVICE))
    tiles = tile_table(case, max_prefill_tiles(num_tokens + 40, len(seqs), block_m))
    torch.testing.assert_close(case.run(tiles=tiles), case.reference(), **tolerance(torch.float32))


def test_tile_table_names_every_query_block() -> None:
    lens = np.array([37, 0, 1, 16, 17, 5])
    table = np.zeros((2, max_prefill_tiles(int(lens.sum()), len(lens), 16)), dtype=np.int64)
    assert prefill_tiles(lens, 16, table) == 3 + 0 + 1 + 1 + 2 + 1
    named = {(int(s), int(b)) for s, b in table.T if s >= 0}
    assert named == {(0, 0), (0, 1), (0, 2), (2, 0), (3, 0), (4, 0), (4, 1), (5, 0)}
    assert (table[0, 8:] == -1).all()
    with pytest.raises(ValueError, match="tiles"):
        prefill_tiles(lens, 16, np.zeros((2, 4), dtype=np.int64))


def test_rejects_bad_inputs() -> None:
    case = Case([(2, 3), (0, 4)], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    args = (
        case.q,
        case.k_pool,
        case.v_pool,
        case.req_to_token,
        case.req_indices,
        case.start_pos,
        case.cu_new_lens,
        0.1,
    )
    with pytest.raises(ValueError, match="multiple"):
        prefill_attention(case.q[:, :3], *args[1:])
    with pytest.raises(ValueError, match="cu_new_lens"):
        prefill_attention(*args[:6], case.cu_new_lens[1:], 0.1)
    with pytest.raises(ValueError, match="start_pos"):
        prefill_attention(*args[:5], case.start_pos.float(), *args[6:])
    with pytest.raises(ValueError, match="out"):
        prefill_attention(*args, case.q[:1])
    with pytest.raises(ValueError, match="sliding_window"):
        prefill_attention(*args, sliding_window=0)
    with pytest.raises(ValueError, match="scales"):
        prefill_attention(*args[:1], case.k_pool.to(torch.int8), case.v_pool.to(torch.int8), *args[3:])
    with pytest.raises(ValueError, match="tiles"):
        prefill_attention(*args, tiles=torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="alibi_slopes"):
        prefill_attention(*args, alibi_slopes=torch.ones(3))  # one per head: 4
    with pytest.raises(ValueError, match="alibi_slopes"):
        prefill_attention(*args, alibi_slopes=torch.ones(4, dtype=torch.float64))


# ---- GPU, real shapes ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shapes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    # 64 sequences: fresh prompts, long cached prefixes with short chunks, single tokens.
    starts = torch.randint(0, 3000, (64,), generator=gen)
    starts[:16] = 0
    new_lens = torch.randint(1, 1025, (64,), generator=gen)
    new_lens[48:] = 1
    seqs = list(zip(starts.tolist(), new_lens.tolist(), strict=True))
    case = Case(seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype).to("cuda")
    reference = case.reference()
    torch.testing.assert_close(case.run(max_new_len=max(new_lens.tolist())), reference, atol=1e-2, rtol=1e-2)
    tiles = tile_table(case, max_prefill_tiles(int(new_lens.sum()), 256, prefill_block_m(torch.device("cuda"))))
    torch.testing.assert_close(case.run(tiles=tiles), reference, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("group", "head_dim", "window", "int8"), [(1, 64, None, False), (4, 128, 700, True)])
def test_gpu_variants(group: int, head_dim: int, window: int | None, int8: bool) -> None:
    seqs = [(0, 4096), (1000, 2000), (3000, 1), (0, 777), (2500, 1500)]
    case = Case(
        seqs,
        num_heads=8 * group,
        num_kv_heads=8,
        head_dim=head_dim,
        dtype=torch.bfloat16,
        int8=int8,
        window=window,
    ).to("cuda")
    torch.testing.assert_close(case.run(max_new_len=4096), case.reference(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("heads", "int8"), [(32, False), (32, True), (16, False)])
def test_gpu_alibi_real_shapes(heads: int, int8: bool) -> None:
    # bloom-7b1's attention (32 heads of 128) and bloom-560m's head count; eager and tiled.
    seqs = [(0, 1100), (700, 300), (2000, 1), (0, 5), (300, 129)]
    case = Case(seqs, num_heads=heads, num_kv_heads=heads, head_dim=128, dtype=torch.bfloat16, int8=int8, alibi=True)
    case.to("cuda")
    reference = case.reference()
    torch.testing.assert_close(case.run(max_new_len=1100), reference, atol=1e-2, rtol=1e-2)
    tiles = tile_table(case, max_prefill_tiles(sum(n for _, n in seqs), 32, prefill_block_m(torch.device("cuda"))))
    torch.testing.assert_close(case.run(tiles=tiles), reference, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("num_heads", "int8"), [(48, False), (48, True), (16, False)], ids=["starcoder", "starcoder-int8", "santacoder"])
def test_gpu_multi_query_real_shapes(num_heads: int, int8: bool) -> None:
    # StarCoder (48 query heads) and SantaCoder (16): one kv head of 128, contexts up to its 8 192
    # (the reference's float32 scores of 48 heads bound the chunk sizes)
    seqs = [(0, 3072), (1000, 2000), (8000, 1), (0, 777), (6500, 1500)]
    case = Case(seqs, num_heads=num_heads, num_kv_heads=1, head_dim=128, dtype=torch.bfloat16, int8=int8).to("cuda")
    torch.testing.assert_close(case.run(max_new_len=3072), case.reference(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_int8_half_precision(dtype: torch.dtype) -> None:
    seqs = [(0, 1100), (700, 300), (2000, 1), (0, 5)]
    case = Case(seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, int8=True).to("cuda")
    torch.testing.assert_close(case.run(max_new_len=1100), case.reference(), atol=1e-2, rtol=1e-2)
    if dtype == torch.bfloat16:  # outputs of 1e-6 are fp16 subnormals: only bf16 holds them
        case.assert_tiny_scales_kept(max_new_len=1100)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("launch", [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)])
@pytest.mark.parametrize("int8", [False, True])
def test_gpu_other_launches(launch: tuple[int, int, int, int], int8: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Launches scripts/attention_bench.py --prefill-launches times against the default: the same
    # results at the 8B shape, with cached prefixes, single tokens and the tile table.
    import engine.kernels.prefill_attention as module

    monkeypatch.setattr(module, "PREFILL_LAUNCH", launch)
    seqs = [(0, 1100), (700, 300), (2000, 1), (0, 5), (300, 129)]
    case = Case(seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, int8=int8).to("cuda")
    reference = case.reference()
    torch.testing.assert_close(case.run(max_new_len=1100), reference, atol=1e-2, rtol=1e-2)
    block_m = prefill_block_m(torch.device("cuda"))
    tiles = tile_table(case, max_prefill_tiles(sum(n for _, n in seqs), 32, block_m))
    torch.testing.assert_close(case.run(tiles=tiles), reference, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_timing() -> None:
    """Prints kernel time beside causal SDPA on dense, already gathered K/V (not an assertion)."""
    seqs = [(0, 2048)] * 8
    case = Case(seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16).to("cuda")
    out = torch.empty_like(case.q)
    slots = case.req_to_token[case.req_indices, :2048].long()  # [8, L]
    k = case.k_pool[slots].transpose(1, 2)  # [8, KV, L, D]
    v = case.v_pool[slots].transpose(1, 2)
    q = case.q.view(8, 2048, 32, 128).transpose(1, 2)

    def kernel() -> None:
        prefill_attention(
            case.q,
            case.k_pool,
            case.v_pool,
            case.req_to_token,
            case.req_indices,
            case.start_pos,
            case.cu_new_lens,
            case.scale,
            out,
            max_new_len=2048,
        )

    def sdpa() -> None:
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=case.scale, enable_gqa=True
        )

    times = {name: _cuda_time_ms(fn) for name, fn in [("kernel", kernel), ("sdpa", sdpa)]}
    flops = 8 * 32 * 2048 * 2048 * 128 * 2  # causal half of 4 * T * L * D per head
    print(
        "\nprefill 8 x 2048 H=32 KV=8 D=128 bf16: "
        + ", ".join(f"{n} {t * 1e3:.0f} us ({flops / t / 1e9:.0f} TFLOP/s)" for n, t in times.items())
    )
    torch.testing.assert_close(out, case.reference(), atol=1e-2, rtol=1e-2)


def _cuda_time_ms(fn: object, iters: int = 20) -> float:
    assert callable(fn)
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
