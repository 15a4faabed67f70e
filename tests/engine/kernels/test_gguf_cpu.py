"""The GGUF CPU kernels against the `gguf` package's own dequantization: each format's
dequantization bit for bit, its product with a few rows (the block kernel) and with many rows
(the dequantized GEMM) equal to dequantize-then-matmul up to the float32 sums' order; with int8
activations, equal to the dequantized weight times the activations quantized as the kernel
quantizes them (per row and block, max|x| / 127) and dequantized."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from engine.kernels import gguf_cpu
from engine.layers.gguf_linear import GGUFWeight, Segment

QT = gguf.GGMLQuantizationType
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# The gguf package has no quantizer for the K-quants: where their fp16 scales lie, and how many.
K_QUANT_SCALES = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208, 1), QT.Q2_K: (80, 2)}


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    """The kernels build here (the CI machine has a C++ compiler): a failed build fails."""
    assert gguf_cpu.available(), f"the GGUF CPU kernels did not build: {gguf_cpu.build_error()}"


def random_blocks(qtype: QT, rows: int, cols: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    """Blocks of `qtype` as uint8 [rows, bytes per row]: the gguf quantizer's output for the
    types it quantizes (of normal values times `scale` * 30); random codes and sub-block scales
    with positive fp16 scales below `scale` for the K-quants."""
    rng = np.random.default_rng(seed)
    if qtype not in K_QUANT_SCALES:
        values = rng.standard_normal((rows, cols)) * scale * 30
        return gguf.quants.quantize(values.astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    offset, count = K_QUANT_SCALES[qtype]
    scales = (rng.random((rows, cols // block, count)) * scale).astype(np.float16).view(np.uint8)
    raw[..., offset : offset + 2 * count] = scales.reshape(rows, cols // block, 2 * count)
    return raw.reshape(rows, -1)


def reference(blocks: np.ndarray, qtype: QT, rows: int, cols: int) -> torch.Tensor:
    values = np.array(gguf.quants.dequantize(blocks, qtype), dtype=np.float32)
    return torch.from_numpy(values).reshape(rows, cols)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_is_gguf_dequantize_exactly(qtype: QT) -> None:
    rows, cols = 19, 512
    blocks = random_blocks(qtype, rows, cols)
    ours = gguf_cpu.gguf_dequantize(torch.from_numpy(blocks), int(qtype), cols)
    torch.testing.assert_close(ours, reference(blocks, qtype, rows, cols), rtol=0, atol=0)


def int8_activations(x: torch.Tensor, qtype: QT) -> torch.Tensor:
    """x [M, K] quantized as the kernels do (per row and block of the weight's block size:
    round(x * 127 / max|x|), ties to even), dequantized (times max|x| / 127)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    blocks = x.reshape(x.shape[0], -1, block)
    top = blocks.abs().amax(-1, keepdim=True)
    # a float32 division (`127.0 / top` would multiply by top's reciprocal: another rounding)
    inverse = torch.where(top > 0, torch.full_like(top, 127.0) / top, torch.zeros_like(top))
    return (torch.round(blocks * inverse) * (top / 127)).reshape(x.shape)


def assert_product(qtype: QT, num_tokens: int, rows: int, cols: int, seed: int, int8: bool = False) -> None:
    blocks = random_blocks(qtype, rows, cols, seed=seed)
    x = torch.randn(num_tokens, cols, generator=torch.Generator().manual_seed(seed + 1))
    out = gguf_cpu.gguf_mm(x, torch.from_numpy(blocks), int(qtype), int8_activations=int8)
    quantized = int8 and gguf_cpu.has_int8_activations() and num_tokens <= gguf_cpu.MAX_DIRECT_ROWS
    expected = (int8_activations(x, qtype) if quantized else x).double() @ reference(blocks, qtype, rows, cols).double().T
    assert out.shape == (num_tokens, rows) and out.dtype == torch.float32
    # float32 sums in another order: a few ulps of the largest terms, far below any format's step
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


# Decode batches: one row, the tile sizes and their neighbours (the rows of a batch are taken in
# balanced tiles of up to 12 with AVX-512, 6 with AVX2 / NEON), up to the direct kernel's limit;
# then a prefill past it (the dequantized GEMM).
NUM_TOKENS = [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 16, 25, 33, 63, 64, gguf_cpu.MAX_DIRECT_ROWS + 5]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_matmul_equals_dequantize_then_matmul(qtype: QT, num_tokens: int) -> None:
    # rows: not a multiple of the kernel's row chunk; columns: 24 blocks of 32, 3 of 256
    assert_product(qtype, num_tokens, rows=37, cols=768, seed=num_tokens)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize(("num_tokens", "rows", "cols"), [(1, 1, 256), (9, 3, 256), (2, 5, 1280), (17, 61, 2304)])
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_matmul_at_odd_sizes(qtype: QT, num_tokens: int, rows: int, cols: int, int8: bool) -> None:
    """One weight row, fewer weight rows than threads or a row chunk, odd numbers of blocks
    (5 and 9 super-blocks of 256), a K longer than one slice of the activations."""
    assert_product(qtype, num_tokens, rows, cols, seed=rows, int8=int8)


# The int8 path's tiles: up to 8 rows with AVX-512, 4 with AVX2; 64 is the direct kernel's limit.
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("num_tokens", [1, 3, 12, 13, 64, gguf_cpu.MAX_DIRECT_ROWS + 1])
def test_matmul_with_int8_activations(qtype: QT, num_tokens: int) -> None:
    """The product with x quantized to int8 per block equals the dequantized weight times the
    dequantized int8 activations (past the direct kernel's rows: the float32 GEMM's product)."""
    assert_product(qtype, num_tokens, rows=37, cols=768, seed=num_tokens, int8=True)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda q: q.name)
def test_int8_activations_of_extreme_values(qtype: QT) -> None:
    """Rows of zeros, one large value among small ones, a constant block: the scale of each
    block is its own (zero rows give zeros, no NaN)."""
    cols = 512
    blocks = random_blocks(qtype, 8, cols)
    x = torch.zeros(3, cols)
    x[1, 5] = 1e4
    x[1, 6:40] = 1e-3
    x[2, 256:] = -2.5
    out = gguf_cpu.gguf_mm(x, torch.from_numpy(blocks), int(qtype), int8_activations=True)
    quantized = int8_activations(x, qtype) if gguf_cpu.has_int8_activations() else x
    expected = quantized.double() @ reference(blocks, qtype, 8, cols).double().T
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_int8_types_follow_the_setting() -> None:
    """auto: the K-quants; int8: every format; float32: none (none at all without the path)."""
    everything = gguf_cpu.has_int8_activations()
    assert gguf_cpu.int8_types("auto") == (gguf_cpu.K_QUANT_TYPES if everything else frozenset())
    assert gguf_cpu.int8_types("int8") == (gguf_cpu.SUPPORTED_TYPES if everything else frozenset())
    assert gguf_cpu.int8_types("float32") == frozenset()
    with pytest.raises(ValueError, match="gguf_activations"):
        gguf_cpu.int8_types("int4")


def test_int8_activations_are_closer_to_float_than_a_format_step() -> None:
    """The quantization of x costs about what int8 rounding costs (~1 % of a product), not more."""
    cols = 2048
    blocks = random_blocks(QT.Q4_K, 64, cols)
    x = torch.randn(4, cols)
    exact = gguf_cpu.gguf_mm(x, torch.from_numpy(blocks), int(QT.Q4_K))
    int8 = gguf_cpu.gguf_mm(x, torch.from_numpy(blocks), int(QT.Q4_K), int8_activations=True)
    assert float((int8 - exact).norm() / exact.norm()) < 0.02


def test_segments_of_mixed_types_are_side_by_side_and_take_bfloat16() -> None:
    """A fused layer stored as Q4_K rows then Q6_K rows (Q4_K_M's mix), with a bias, on bf16
    activations: the rows of each part's product, in order, in bf16."""
    cols = 512
    parts = [(QT.Q4_K, random_blocks(QT.Q4_K, 16, cols)), (QT.Q6_K, random_blocks(QT.Q6_K, 8, cols, seed=1))]
    weight = GGUFWeight(
        cols, (Segment(0, int(QT.Q4_K), torch.from_numpy(parts[0][1])), Segment(16, int(QT.Q6_K), torch.from_numpy(parts[1][1])))
    )
    dense = torch.cat([reference(b, q, b.shape[0], cols) for q, b in parts])
    torch.testing.assert_close(weight.dequantize(), dense, rtol=0, atol=0)
    x = torch.randn(2, cols).bfloat16()
    bias = torch.randn(24)
    out = weight(x, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 24)
    torch.testing.assert_close(out.float(), (x.float() @ dense.T + bias).bfloat16().float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q4_K, QT.Q6_K], ids=lambda q: q.name)
def test_prefill_in_bfloat16_rounds_both_operands_and_sums_in_float32(qtype: QT) -> None:
    """`gguf_prefill` bfloat16: past the block kernel's rows the product is the bf16-rounded
    activations times the bf16-rounded dequantized weight, summed in float32 (not bf16) and rounded
    to bf16, in x's dtype; up to the block kernel's rows it stays the exact float32 product."""
    rows, cols = 40, 768
    blocks = random_blocks(qtype, rows, cols, seed=3)
    dense = reference(blocks, qtype, rows, cols)
    weight = GGUFWeight(cols, (Segment(0, int(qtype), torch.from_numpy(blocks)),), prefill_dtype=torch.bfloat16)
    x = torch.randn(gguf_cpu.MAX_DIRECT_ROWS + 7, cols, generator=torch.Generator().manual_seed(4))
    out = weight(x, None)
    assert out.dtype == torch.float32
    expected = x.bfloat16().double() @ dense.bfloat16().double().T
    # one bf16 rounding of a float32 sum: half an ulp of 8 bits (a bf16 sum would be far off)
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-5 * float(expected.abs().max()))
    exact = x.double() @ dense.double().T
    assert not torch.allclose(out.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    decode = weight(x[: gguf_cpu.MAX_DIRECT_ROWS], None)
    torch.testing.assert_close(decode.double(), exact[: gguf_cpu.MAX_DIRECT_ROWS], rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


def test_wrong_row_size_is_refused() -> None:
    blocks = torch.from_numpy(random_blocks(QT.Q8_0, 4, 64))
    with pytest.raises(RuntimeError, match="bytes per row"):
        gguf_cpu.gguf_mm(torch.randn(1, 96), blocks, int(QT.Q8_0))
