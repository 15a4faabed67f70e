"""The CPU decode step's C++ ops against torch: RMSNorm (with the residual add) and one-token
attention read in place from the KV pool, equal up to the float32 sums' order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_decode, gguf_cpu


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    assert gguf_cpu.available(), f"the CPU kernels did not build: {gguf_cpu.build_error()}"


@pytest.mark.parametrize(("rows", "cols"), [(1, 576), (16, 576), (3, 37), (70, 64)])
def test_rms_norm_with_and_without_residual(rows: int, cols: int) -> None:
    x, residual, weight = torch.randn(rows, cols), torch.randn(rows, cols), torch.randn(cols)
    normed, same = cpu_decode.rms_norm(x, None, weight, 1e-5)
    torch.testing.assert_close(normed, F.rms_norm(x, (cols,), weight, 1e-5), rtol=1e-5, atol=1e-6)
    assert torch.equal(same, x)
    normed, total = cpu_decode.rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, x + residual)  # the same float32 adds
    torch.testing.assert_close(normed, F.rms_norm(x + residual, (cols,), weight, 1e-5), rtol=1e-5, atol=1e-6)


def reference_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: list[list[int]], scale: float
) -> torch.Tensor:
    """Each sequence's keys gathered, then torch's attention (query heads grouped per kv head)."""
    out = []
    for b, seq_slots in enumerate(slots):
        index = torch.tensor(seq_slots)
        k, v = k_pool[index].transpose(0, 1), v_pool[index].transpose(0, 1)  # [KV, L, D]
        group = q.shape[1] // k.shape[0]
        qb = q[b].view(k.shape[0], group, -1)  # [KV, G, D]
        out.append(F.scaled_dot_product_attention(qb, k, v, scale=scale).reshape(q.shape[1], -1))
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 40)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_reads_the_pool_in_place(heads: int, kv_heads: int, head_dim: int, window: int | None) -> None:
    gen = torch.Generator().manual_seed(heads + head_dim)
    num_slots, lens = 200, [1, 7, 33, 120]
    k_pool = torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    perm = torch.randperm(num_slots, generator=gen).tolist()  # scattered slots, as a pool hands them out
    req_to_token = torch.full((6, 128), 7, dtype=torch.int32)  # stale ids past each length
    rows = [4, 0, 5, 2]
    slots = []
    for i, (row, length) in enumerate(zip(rows, lens, strict=True)):
        seq = perm[i * 40 : i * 40 + length] if length <= 40 else perm[:length]
        req_to_token[row, :length] = torch.tensor(seq, dtype=torch.int32)
        slots.append(seq[-window:] if window else seq)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    out = cpu_decode.decode_attention(
        q, k_pool, v_pool, req_to_token, torch.tensor(rows), torch.tensor(lens), head_dim**-0.5, window
    )
    expected = reference_attention(q, k_pool, v_pool, slots, head_dim**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_softmax_over_a_wide_range_of_scores() -> None:
    """Scores hundreds apart (most numerators below float32's range, a few near the top), as the
    vectorized exponential must get them: 0 where std::exp underflows, within a few ulps elsewhere."""
    gen = torch.Generator().manual_seed(5)
    k_pool = torch.randn(300, 2, 64, generator=gen) * 8
    v_pool = torch.randn(300, 2, 64, generator=gen)
    req_to_token = torch.arange(300, dtype=torch.int32).view(2, 150)
    q = torch.randn(2, 4, 64, generator=gen) * 8
    lens = [150, 37]
    out = cpu_decode.decode_attention(q, k_pool, v_pool, req_to_token, torch.tensor([0, 1]), torch.tensor(lens), 0.125, None)
    slots = [list(range(150)), list(range(150, 187))]
    torch.testing.assert_close(out, reference_attention(q, k_pool, v_pool, slots, 0.125), rtol=1e-5, atol=1e-5)
