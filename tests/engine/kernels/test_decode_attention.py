"""Decode attention kernel against a few-line torch reference over the same pool.

Without CUDA these run under the Triton interpreter (conftest) at tiny shapes, where the
launcher picks small tiles, so several splits and several key blocks per split are covered.
"""

from __future__ import annotations

import math

import pytest
import torch

import engine.kernels.decode_attention as decode_module
from engine.kernels.decode_attention import decode_attention
from engine.kernels.timing import graph_time_ms
from engine.layers.alibi import alibi_slopes
from tests.engine.kernels.pools import NAN, PoisonedPool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Case(PoisonedPool):
    """One decode step over a `PoisonedPool`: a query per sequence; keys outside a sliding
    window point at poisoned slots too."""

    def __init__(
        self,
        seq_lens: list[int],
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
        batch = len(seq_lens)
        unseen = [0 if window is None else max(0, length - window) for length in seq_lens]
        super().__init__(gen, seq_lens, unseen, num_kv_heads, head_dim, dtype, int8)
        self.q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int64)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.window = window
        self.alibi_slopes = alibi_slopes(num_heads) if alibi else None  # BLOOM's, of every head

    def run(self, **kwargs: object) -> torch.Tensor:
        out = torch.full_like(self.q, NAN)  # poisoned: an unwritten element fails the test
        result = decode_attention(
            self.q,
            self.k_pool,
            self.v_pool,
            self.req_to_token,
            self.req_indices,
            self.seq_lens,
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
        """Gather each sequence's (windowed) keys, repeat kv heads, softmax in float32 (with
        ALiBi, slope_h * (key position - query position) added to head h's scores)."""
        group = self.q.shape[1] // self.k_pool.shape[1]
        outs = []
        for b, length in enumerate(self.seq_lens.tolist()):
            first = max(0, length - self.window) if self.window is not None else 0
            slots = self.req_to_token[self.req_indices[b], first:length].long()
            k, v = self.k_pool[slots].float(), self.v_pool[slots].float()  # [L, KV, D]
            if self.k_scale is not None and self.v_scale is not None:
                k = k * self.k_scale[slots].float()[..., None]
                v = v * self.v_scale[slots].float()[..., None]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,lhd->hl", self.q[b].float(), k) * self.scale
            if self.alibi_slopes is not None:
                k_pos = torch.arange(first, length, device=scores.device)
                scores = scores + self.alibi_slopes.float()[:, None] * (k_pos - (length - 1))
            outs.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
        return torch.stack(outs).to(self.q.dtype)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


@pytest.mark.parametrize(
    ("group", "head_dim", "dtype"),
    [
        (1, 64, torch.float32),
        (4, 64, torch.float32),
        (8, 64, torch.float16),
        (4, 128, torch.float32),
    ],
)
def test_matches_reference_on_ragged_batch(group: int, head_dim: int, dtype: torch.dtype) -> None:
    case = Case([1, 17, 40, 75], num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype).to(
        DEVICE
    )
    torch.testing.assert_close(case.run(max_seq_len=75), case.reference(), **tolerance(dtype))


@pytest.mark.parametrize("int8", [False, True])
def test_multi_query_one_kv_head_serves_a_large_group(int8: bool) -> None:
    # GPTBigCode: all 20 query heads read the one kv head (a group padded to 32 rows)
    case = Case([1, 17, 40, 75], num_heads=20, num_kv_heads=1, head_dim=64, dtype=torch.float32, int8=int8)
    torch.testing.assert_close(case.to(DEVICE).run(max_seq_len=75), case.reference(), **tolerance(torch.float32))


def test_sliding_window_excludes_old_keys() -> None:
    # Keys outside the window point at NaN slots: reading one would poison the output.
    case = Case([5, 20, 21, 70], num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32, window=20)
    case.to(DEVICE)
    torch.testing.assert_close(case.run(max_seq_len=70), case.reference(), **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_pool_dequantized_with_scales(dtype: torch.dtype) -> None:
    # float32 queries dequantize into float32 dots; half-precision ones read the int8 values as
    # fp16 integers (bit trick) with the V scales folded into the probabilities.
    case = Case([3, 33, 50], num_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype, int8=True)
    case.to(DEVICE)
    out = case.run(max_seq_len=50)
    torch.testing.assert_close(out, case.reference(), **tolerance(dtype))


def test_int8_pool_with_tiny_scales_in_half_precision() -> None:
    # Scales far below fp16's smallest normal number (6e-5): the block maximum keeps them exact.
    case = Case([17, 40], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, int8=True)
    case.to(DEVICE).assert_tiny_scales_kept(max_seq_len=40)


@pytest.mark.parametrize(("group", "num_splits"), [(3, None), (3, 1), (1, 5), (5, 3)])
def test_int8_pool_with_window_and_fixed_splits(group: int, num_splits: int | None) -> None:
    # Groups of 1, 3 and 5 query heads (padded to 16 rows for tl.dot), a sliding window whose
    # old keys point at NaN slots, a graph's fixed splits, a padded row.
    case = Case([5, 20, 41, 70, 0], num_heads=2 * group, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                int8=True, window=23)
    case.to(DEVICE)
    out = case.run(max_seq_len=70, num_splits=num_splits)
    torch.testing.assert_close(out[:4], case.reference()[:4], **tolerance(torch.float32))
    assert torch.equal(out[4], torch.zeros_like(out[4]))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "int8", "dtype", "num_splits"),
    [
        (4, 4, False, torch.float32, None),  # several splits per sequence
        (6, 6, False, torch.float32, 1),  # one split, written directly; 6 heads: BLOOM's odd slopes
        (6, 2, True, torch.float32, None),  # a group of 3 query heads with their own slopes
        (12, 12, True, torch.float16, 3),
        (8, 2, False, torch.float16, None),  # (the interpreter's bf16 dots are wrong: bf16 on a GPU only)
    ],
)
def test_alibi_matches_reference(
    heads: int, kv_heads: int, int8: bool, dtype: torch.dtype, num_splits: int | None
) -> None:
    case = Case([1, 17, 40, 75, 0], num_heads=heads, num_kv_heads=kv_heads, head_dim=32, dtype=dtype, int8=int8,
                alibi=True)
    case.to(DEVICE)
    out = case.run(max_seq_len=75, num_splits=num_splits)
    reference = case.reference()
    torch.testing.assert_close(out[:4], reference[:4], **tolerance(dtype))
    assert torch.equal(out[4], torch.zeros_like(out[4]))  # a padded row
    case.alibi_slopes = None  # the bias matters at these lengths: without it the output differs
    assert (case.reference()[:4].float() - reference[:4].float()).abs().max() > 0.1


def test_without_max_seq_len_hint_uses_row_length() -> None:
    case = Case([9, 2, 38], num_heads=4, num_kv_heads=1, head_dim=64, dtype=torch.float32).to(DEVICE)
    torch.testing.assert_close(case.run(), case.reference(), **tolerance(torch.float32))


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_fixed_splits_as_a_graph_launches_them(num_splits: int) -> None:
    # A CUDA graph fixes the grid: every sequence cuts its keys into `num_splits` splits of
    # its own length (1 split: one program per sequence and kv head; 16: more splits than
    # key blocks for the short ones). A padded row (seq_len 0) gets zeros.
    case = Case([1, 17, 40, 75, 0], num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32).to(DEVICE)
    out = case.run(max_seq_len=128, num_splits=num_splits)
    expected = case.reference()
    torch.testing.assert_close(out[:4], expected[:4], **tolerance(torch.float32))
    assert torch.equal(out[4], torch.zeros_like(out[4]))


def test_long_contexts_in_a_large_batch_get_longer_splits() -> None:
    # 512 sequences x 8 kv heads of 128k keys: splits grow so the scratch stays bounded.
    gpu = torch.device("cuda")
    splits = decode_module.default_num_splits(gpu, 512 * 8, 131072)
    assert 512 * 8 * splits <= decode_module._MAX_PROGRAMS
    assert decode_module.default_num_splits(gpu, 8, 131072) == 512  # one sequence: splits of 256 keys
    assert decode_module.default_num_splits(gpu, 8, 4096) == 64  # short: halved to fill the GPU


def test_rejects_bad_inputs() -> None:
    case = Case([4, 6], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    args = (case.q, case.k_pool, case.v_pool, case.req_to_token, case.req_indices, case.seq_lens, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(case.q[:, :3], *args[1:])
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(case.q[..., :48], case.k_pool[..., :48], case.v_pool[..., :48], *args[3:])
    with pytest.raises(ValueError, match="req_to_token"):
        decode_attention(*args[:3], case.req_to_token.long(), *args[4:])
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(*args[:5], case.seq_lens[:1], 0.1)
    with pytest.raises(ValueError, match="out"):
        decode_attention(*args, torch.empty_like(case.q, dtype=torch.float16))
    with pytest.raises(ValueError, match="scales"):
        decode_attention(*args[:1], case.k_pool.to(torch.int8), case.v_pool.to(torch.int8), *args[3:])
    with pytest.raises(ValueError, match="alibi_slopes"):
        decode_attention(*args, alibi_slopes=torch.ones(2))  # one per query head: 4


# ---- GPU, real shapes ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [64, 256])
def test_gpu_real_shapes(batch: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 4097, (batch,), generator=gen).tolist()
    case = Case(seq_lens, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, seed=batch).to("cuda")
    torch.testing.assert_close(case.run(max_seq_len=max(seq_lens)), case.reference(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("group", "head_dim", "window", "int8"), [(1, 64, None, False), (4, 128, 1000, True)]
)
def test_gpu_variants(group: int, head_dim: int, window: int | None, int8: bool) -> None:
    seq_lens = torch.randint(1, 3000, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    case = Case(
        seq_lens,
        num_heads=8 * group,
        num_kv_heads=8,
        head_dim=head_dim,
        dtype=torch.bfloat16,
        int8=int8,
        window=window,
    ).to("cuda")
    torch.testing.assert_close(case.run(max_seq_len=max(seq_lens)), case.reference(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("heads", "int8", "num_splits"), [(32, False, None), (32, True, None), (16, False, 1)])
def test_gpu_alibi_real_shapes(heads: int, int8: bool, num_splits: int | None) -> None:
    # bloom-7b1's attention (32 heads of 128) and bloom-560m's head count; split-K and one split.
    seq_lens = torch.randint(1, 3000, (96,), generator=torch.Generator().manual_seed(2)).tolist()
    case = Case(seq_lens, num_heads=heads, num_kv_heads=heads, head_dim=128, dtype=torch.bfloat16, int8=int8,
                alibi=True).to("cuda")
    out = case.run(max_seq_len=max(seq_lens), num_splits=num_splits)
    torch.testing.assert_close(out, case.reference(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("num_heads", "int8"), [(48, False), (48, True), (16, False)], ids=["starcoder", "starcoder-int8", "santacoder"])
def test_gpu_multi_query_real_shapes(num_heads: int, int8: bool) -> None:
    # StarCoder (48 query heads) and SantaCoder (16): one kv head of 128, contexts up to 8 192
    seq_lens = torch.randint(1, 8193, (64,), generator=torch.Generator().manual_seed(num_heads)).tolist()
    case = Case(seq_lens, num_heads=num_heads, num_kv_heads=1, head_dim=128, dtype=torch.bfloat16, int8=int8)
    torch.testing.assert_close(case.to("cuda").run(max_seq_len=max(seq_lens)), case.reference(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["pinned", "asm", "add", "pinned-n64w4s3", "asm-n64w4s3", "pinned-n128w8s2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_int8_variants(dtype: torch.dtype, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The inline-PTX int8 -> fp16 conversion kept where the block is loaded ("pinned", the GPU
    # default) or free to move ("asm"), or the add-and-bitcast one, and other launches.
    conversion, _, launch = variant.partition("-")
    monkeypatch.setattr(decode_module, "INT8_ASM", conversion != "add")
    monkeypatch.setattr(decode_module, "INT8_PINNED", conversion == "pinned")
    launches = {"n64w4s3": (64, 4, 3), "n128w8s2": (128, 8, 2)}
    if launch:  # otherwise the default launch
        monkeypatch.setattr(decode_module, "INT8_TC_LAUNCH", launches[launch])
    seq_lens = torch.randint(1, 3000, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    case = Case(seq_lens, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, int8=True).to("cuda")
    torch.testing.assert_close(case.run(max_seq_len=3000), case.reference(), atol=1e-2, rtol=1e-2)
    if dtype == torch.bfloat16:  # outputs of 1e-6 are fp16 subnormals: only bf16 holds them
        case.assert_tiny_scales_kept(max_seq_len=3000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("launch", [(64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3), (32, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_float_launches(launch: tuple[int, int, int], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # The launches scripts/attention_bench.py --decode-launches times, at the 8B shape, with a
    # window cutting some sequences, into a poisoned output; split, and in one split per
    # sequence (stage 1 writes the output: a graph's launch at 512 sequences), with an empty row.
    monkeypatch.setattr(decode_module, "FLOAT_LAUNCH", launch)
    seq_lens = torch.randint(1, 3000, (64,), generator=torch.Generator().manual_seed(3)).tolist() + [0]
    for window in (None, 700):
        case = Case(seq_lens, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, window=window).to("cuda")
        expected = case.reference()
        for num_splits in (None, 1):
            out = case.run(max_seq_len=3000, num_splits=num_splits)
            torch.testing.assert_close(out[:-1], expected[:-1], atol=1e-2, rtol=1e-2)
            assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("batch", "seq_len"), [(1, 4096), (64, 1024), (256, 2048)])
def test_gpu_timing_against_sdpa(batch: int, seq_len: int) -> None:
    """Prints kernel time beside SDPA on K/V already gathered into a dense batch (not an assertion)."""
    case = Case([seq_len] * batch, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16).to(
        "cuda"
    )
    slots = case.req_to_token[case.req_indices, :seq_len].long()  # [B, L]
    k = case.k_pool[slots].transpose(1, 2)  # [B, KV, L, D]
    v = case.v_pool[slots].transpose(1, 2)
    q = case.q.unsqueeze(2)  # [B, H, 1, D]
    out = torch.empty_like(case.q)

    def kernel() -> None:
        decode_attention(
            case.q,
            case.k_pool,
            case.v_pool,
            case.req_to_token,
            case.req_indices,
            case.seq_lens,
            case.scale,
            out,
            max_seq_len=seq_len,
        )

    def sdpa() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=case.scale, enable_gqa=True)

    def gather_sdpa() -> None:
        s = case.req_to_token[case.req_indices, :seq_len].long()
        torch.nn.functional.scaled_dot_product_attention(
            q,
            case.k_pool[s].transpose(1, 2),
            case.v_pool[s].transpose(1, 2),
            scale=case.scale,
            enable_gqa=True,
        )

    # Graph replays, as decode steps run in the engine: GPU time without the launch overhead.
    times = {
        name: graph_time_ms(fn)
        for name, fn in [("kernel", kernel), ("sdpa", sdpa), ("gather+sdpa", gather_sdpa)]
    }
    kv_bytes = 2 * batch * seq_len * 8 * 128 * 2
    print(
        f"\ndecode B={batch} L={seq_len} H=32 KV=8 D=128 bf16: "
        + ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in times.items())
        + f"; kernel {kv_bytes / times['kernel'] / 1e6:.0f} GB/s of K/V"
    )
    torch.testing.assert_close(out, case.reference(), atol=1e-2, rtol=1e-2)
