"""The GGUF CPU kernels against the `gguf` package's own dequantization: each format's
dequantization bit for bit, its product with a few rows (the block kernel) and with many rows
(the dequantized GEMM) equal to dequantize-then-matmul up to the float32 sums' order."""

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


def assert_product(qtype: QT, num_tokens: int, rows: int, cols: int, seed: int) -> None:
    blocks = random_blocks(qtype, rows, cols, seed=seed)
    x = torch.randn(num_tokens, cols, generator=torch.Generator().manual_seed(seed + 1))
    out = gguf_cpu.gguf_mm(x, torch.from_numpy(blocks), int(qtype))
    expected = x.double() @ reference(blocks, qtype, rows, cols).double().T
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
def test_matmul_at_odd_sizes(qtype: QT, num_tokens: int, rows: int, cols: int) -> None:
    """One weight row, fewer weight rows than threads or a row chunk, odd numbers of blocks
    (5 and 9 super-blocks of 256), a K longer than one slice of the activations."""
    assert_product(qtype, num_tokens, rows, cols, seed=rows)


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
