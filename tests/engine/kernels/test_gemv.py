"""The decode GEMV (`engine.kernels.gemv`) against torch: `F.linear` in fp32 for 16-bit weights,
`fp8_linear`'s torch path (quantize_fp8_rows, then the dequantized product) for FP8 weights.

Tolerances (the same on the GPU and under the CPU interpreter): the kernel and the reference sum
the same fp32 products in different orders, each within K * 2^-24 of the exact sum of |products|
(the usual bound for recursive fp32 summation), and the kernel rounds once more to the output
dtype (at most one unit roundoff u of it: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32). Anything beyond that
bound is a wrong product, not an ordering effect. The FP8 activation codes themselves are compared
bit for bit (`test_fp8_activation_codes_are_torchs`). Under the interpreter the shapes are small
and explicit launches take the same paths as the GPU's (split K, ragged N and K tails, 1-8 rows).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.gemv import MAX_ROWS, GemvLaunch, default_launch, fp8_gemv, gemv, launch_for
from engine.layers.fp8 import FP8_DTYPE, fp8_linear, quantize_fp8_rows

_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# An 8B Llama layer's products: (N, K) of fused q/k/v, output, fused gate/up, down.
REAL_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
# Small shapes on the same code paths: one tile, ragged N and K, several K splits.
LAUNCHES = [
    None,
    GemvLaunch(16, 64, 3),  # the partial sums added by a second launch
    GemvLaunch(8, 128, 2, num_warps=2, last_finishes=True),  # ... by the split that arrives last
    GemvLaunch(2, 32, 3, num_warps=1, last_finishes=True),
]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m).unsqueeze(1)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen)
    return tuple(t.to(dtype).to(_device()) for t in (x, w, b))


def _sum_error(abs_products: torch.Tensor, k: int) -> torch.Tensor:
    """How far two fp32 sums of the same K products may lie apart: K 2^-24 sum|products| each."""
    return 2 * k * 2.0**-24 * abs_products.double()


def _assert_within(got: torch.Tensor, want: torch.Tensor, extra: torch.Tensor) -> None:
    """|got - want| <= u |want| + extra, u the unit roundoff of got's dtype (see the module docstring)."""
    u = _UNIT_ROUNDOFF[got.dtype]
    got64, want64 = got.double().cpu(), want.double().cpu()
    excess = (got64 - want64).abs() - (u * want64.abs() + extra.double().cpu() + 1e-30)
    assert got.shape == want.shape and not got.isnan().any()
    assert (excess <= 0).all(), f"off by {excess.max().item():.3g} beyond the bound"


# Every launch, shape and dtype at least once (not their product: the interpreter is slow)
@pytest.mark.parametrize(("dtype", "m", "n", "k", "launch"), [
    (torch.bfloat16, 1, 48, 320, LAUNCHES[0]),
    (torch.float16, 3, 64, 512, LAUNCHES[1]),
    (torch.float32, MAX_ROWS, 40, 200, LAUNCHES[2]),
    (torch.bfloat16, 5, 17, 96, LAUNCHES[3]),
    (torch.float32, 1, 48, 320, LAUNCHES[1]),
    (torch.bfloat16, MAX_ROWS, 40, 200, LAUNCHES[0]),
    (torch.float16, 5, 17, 96, LAUNCHES[2]),
])
def test_gemv_matches_linear_in_fp32(m: int, n: int, k: int, dtype: torch.dtype, launch: GemvLaunch | None) -> None:
    x, w, b = _inputs(m, n, k, dtype, seed=m * n + k)
    with_bias = n % 2 == 0
    got = gemv(x, w, b if with_bias else None, launch)
    want = F.linear(x.float(), w.float(), b.float() if with_bias else None)
    assert got.dtype == dtype
    _assert_within(got, want, _sum_error(x.float().abs() @ w.float().abs().t(), k))


def _fp8_abs_products(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """sum_k |dequantized x| |dequantized W|: what bounds the fp32 sums' error."""
    xq, xs = quantize_fp8_rows(x)
    return (xq.float().abs() * xs) @ (wq.float().abs() * ws).t()


@pytest.mark.parametrize(("dtype", "m", "n", "k", "launch"), [
    (torch.bfloat16, 1, 48, 320, LAUNCHES[0]),
    (torch.float16, 3, 64, 512, LAUNCHES[1]),
    (torch.bfloat16, MAX_ROWS, 40, 200, LAUNCHES[2]),
    (torch.float16, 2, 17, 1000, LAUNCHES[0]),
    (torch.bfloat16, 1, 48, 320, LAUNCHES[3]),
    (torch.bfloat16, 2, 17, 1000, LAUNCHES[2]),
])
def test_fp8_gemv_matches_fp8_linear(m: int, n: int, k: int, dtype: torch.dtype, launch: GemvLaunch | None) -> None:
    x, w, b = _inputs(m, n, k, dtype, seed=m * n + k)
    wq, ws = quantize_fp8_rows(w)
    bias = b if n % 2 == 0 else None
    got = fp8_gemv(x, wq, ws, bias, launch)
    # The plain-torch form of fp8_linear (the GPU's form is checked in the GPU tier): its products
    # of dequantized operands round three more times each, and both round the product to the
    # output dtype before the bias is added: one u more of each (|y| <= sum|products| + |bias|).
    want = fp8_linear(x.cpu(), wq.cpu(), ws.cpu(), None if bias is None else bias.cpu())
    assert got.dtype == dtype
    abs_products = _fp8_abs_products(x.cpu(), wq.cpu(), ws.cpu())
    abs_bias = 0.0 if bias is None else bias.cpu().double().abs()
    extra = _sum_error(abs_products, k + 3) + 2 * _UNIT_ROUNDOFF[dtype] * (abs_products.double() + abs_bias)
    _assert_within(got, want, extra)


@pytest.mark.parametrize("launch", [None, GemvLaunch(8, 16, 4), GemvLaunch(8, 16, 4, last_finishes=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_activation_codes_are_torchs(dtype: torch.dtype, launch: GemvLaunch | None) -> None:
    """With an identity weight (scale 1) the output is each activation's e4m3 code times its row
    scale: equal bit for bit to quantize_fp8_rows' codes, ties to even, subnormals and carries
    into the next power of two included."""
    k = 64
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, k, generator=gen) * torch.tensor([[1e-3], [1.0], [3e2]])
    # Row 1 reaches 448 (scale exactly 1): exact ties of the e4m3 grid, the carry case 31.9 -> 32,
    # subnormals (steps of 2^-9) and their ties, zeros of both signs.
    x[1, :12] = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 31.9, 2.0**-9 * 1.5, 2.0**-9 * 2.5,
                              -(2.0**-9) * 0.5, 0.0, -0.0, 0.0146, 240.0 + 8.0])
    x = x.to(dtype).to(_device())
    eye = torch.eye(k).to(FP8_DTYPE).to(_device())
    got = fp8_gemv(x, eye, torch.ones(k, 1, device=_device()), None, launch)
    q, scale = quantize_fp8_rows(x.cpu())
    assert torch.equal(got.cpu(), (q.float() * scale).to(dtype))


def test_fp8_zero_row_gives_zeros() -> None:
    x, w, _ = _inputs(3, 32, 128, torch.bfloat16, seed=3)
    x[1] = 0
    wq, ws = quantize_fp8_rows(w)
    for launch in (None, GemvLaunch(16, 32, 2), GemvLaunch(16, 32, 2, last_finishes=True)):
        got = fp8_gemv(x, wq, ws, None, launch)
        assert not got.isnan().any() and torch.equal(got[1].float().cpu(), torch.zeros(32))


def test_both_split_reductions_give_the_same_bits() -> None:
    """A second launch or the last split: the same partial sums added in the same order. The
    arrival counters are back at zero after each launch (the next one counts from there)."""
    from engine.kernels.gemv import _arrival_counters

    x, w, b = _inputs(5, 40, 384, torch.bfloat16, seed=11)
    wq, ws = quantize_fp8_rows(w)
    for splits in (2, 3, 6):
        apart, last = GemvLaunch(8, 64, splits), GemvLaunch(8, 64, splits, last_finishes=True)
        assert torch.equal(gemv(x, w, b, apart), gemv(x, w, b, last))
        assert torch.equal(fp8_gemv(x, wq, ws, b, apart), fp8_gemv(x, wq, ws, b, last))
    assert not _arrival_counters(x.device).any()


def test_strided_rows() -> None:
    """Rows of a wider tensor (a slice of the step's hidden states) read only their columns, for
    the product and for the FP8 scales alike."""
    wide, w, b = _inputs(4, 24, 160, torch.bfloat16, seed=5)
    x = torch.cat([wide, wide * 100], dim=1)[:, 40:200]  # the columns past 200 would set other scales
    got = gemv(x, w, b, GemvLaunch(8, 32, 2))
    _assert_within(got, F.linear(x.float(), w.float(), b.float()), _sum_error(x.float().abs() @ w.float().abs().t(), 160))
    wq, ws = quantize_fp8_rows(w)
    got = fp8_gemv(x, wq, ws, None, GemvLaunch(8, 32, 2, last_finishes=True))
    assert torch.equal(got, fp8_gemv(x.contiguous(), wq, ws, None, GemvLaunch(8, 32, 2, last_finishes=True)))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m", [1, 4, MAX_ROWS])
def test_default_launch_keeps_every_sm_busy(m: int, fp8: bool) -> None:
    """At the 8B model's shapes on 132 SMs: at least two programs per SM (K split where N alone
    gives fewer), every split at least two tiles of K, a tile row across every thread with 8
    contiguous inputs each, fewer weight rows per tile as activation rows grow."""
    for n, k in REAL_SHAPES:
        launch = default_launch(m, n, k, fp8, num_sms=132)
        programs = -(-n // launch.block_n) * launch.split_k
        assert programs >= 2 * 132, (n, k, launch)
        assert k // launch.split_k >= 2 * launch.block_k
        assert launch.block_k == 8 * 32 * launch.num_warps
        assert launch.block_n * m <= 16


def test_launch_table_by_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A measured entry serves its row bucket and the smaller ones without their own; other
    shapes take the default rule."""
    import engine.kernels.gemv as gemv_module

    tuned = GemvLaunch(32, 128, 4, num_warps=8)
    monkeypatch.setattr(gemv_module, "_TUNED", {("fp8", 4, 4096, 16384): tuned})
    cpu = torch.device("cpu")
    assert launch_for(3, 4096, 14336, True, cpu) == tuned
    assert launch_for(1, 4096, 14336, True, cpu) == tuned
    assert launch_for(8, 4096, 14336, True, cpu) == default_launch(8, 4096, 14336, True)
    assert launch_for(3, 4096, 14336, False, cpu) == default_launch(3, 4096, 14336, False)
    x, w, _ = _inputs(2, 40, 96, torch.bfloat16, seed=9)
    wq, ws = quantize_fp8_rows(w)
    monkeypatch.setattr(gemv_module, "_TUNED", {("fp8", 2, 64, 128): GemvLaunch(8, 32, 2)})
    abs_products = _fp8_abs_products(x.cpu(), wq.cpu(), ws.cpu())
    extra = _sum_error(abs_products, 99) + 2 * _UNIT_ROUNDOFF[torch.bfloat16] * abs_products.double()
    _assert_within(fp8_gemv(x, wq, ws), fp8_linear(x.cpu(), wq.cpu(), ws.cpu(), None), extra)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("n", "k"), REAL_SHAPES)
def test_gpu_real_shapes(n: int, k: int) -> None:
    """bf16 against F.linear in fp32; FP8 against fp8_linear's GPU path (Triton quantization +
    torch._scaled_mm) and its fp32 value, at every row count."""
    _, w, b = _inputs(1, n, k, torch.bfloat16, seed=n + k)
    wq, ws = quantize_fp8_rows(w)
    for m in range(1, MAX_ROWS + 1):
        x = _inputs(m, 1, k, torch.bfloat16, seed=m)[0]
        want = F.linear(x.float(), w.float(), b.float())
        _assert_within(gemv(x, w, b), want, _sum_error(x.float().abs() @ w.float().abs().t(), k))
        got = fp8_gemv(x, wq, ws)
        abs_products = _fp8_abs_products(x, wq, ws)
        xq, xs = quantize_fp8_rows(x)
        exact = (xq.double() @ wq.double().t()) * xs.double() * ws.double().t()
        _assert_within(got, exact, _sum_error(abs_products, k))
        # Both round their fp32 sums to bf16: one u of each.
        extra = _sum_error(abs_products, k) + 2 * _UNIT_ROUNDOFF[torch.bfloat16] * abs_products.double()
        _assert_within(got, fp8_linear(x, wq, ws, None), extra)


@pytest.mark.gpu
@gpu
def test_gpu_same_bits_every_run_and_inside_cuda_graphs() -> None:
    """Split K sums in a fixed order, whether a second launch or the last split adds the partials
    (the same bits either way): ten runs give the same bits; a CUDA graph captured once and
    replayed on new activations gives what an eager call gives."""
    x, w, b = _inputs(MAX_ROWS, 4096, 14336, torch.bfloat16, seed=1)
    wq, ws = quantize_fp8_rows(w)
    apart, last = GemvLaunch(2, 1024, 7, num_warps=4), GemvLaunch(2, 1024, 7, num_warps=4, last_finishes=True)
    products = [lambda: gemv(x, w, b, apart), lambda: gemv(x, w, b, last), lambda: fp8_gemv(x, wq, ws, b, apart),
                lambda: fp8_gemv(x, wq, ws, b, last)]
    assert torch.equal(products[0](), products[1]()) and torch.equal(products[2](), products[3]())
    for product in products:
        first = product()
        assert all(torch.equal(product(), first) for _ in range(10))
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = product()
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, product())
