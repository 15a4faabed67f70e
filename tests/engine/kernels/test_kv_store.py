"""store_kv against the torch path (`index_copy_` and `quantize_int8` of engine.layers.attention)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_store import store_kv
from engine.layers.attention import quantize_int8

_NAN = float("nan")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pools(num_slots: int, kv: int, d: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    # Poisoned: a float pool holds NaN, an int8 pool -128 (never a quantized value), scales NaN.
    if dtype == torch.int8:
        pools = [torch.full((num_slots + 1, kv, d), -128, dtype=torch.int8, device=device) for _ in range(2)]
        scales = [
            torch.full((num_slots + 1, kv), _NAN, dtype=torch.bfloat16, device=device) for _ in range(2)
        ]
        return pools + scales
    return [torch.full((num_slots + 1, kv, d), _NAN, dtype=dtype, device=device) for _ in range(2)]


def _check(
    num_tokens: int,
    kv: int,
    d: int,
    num_slots: int,
    in_dtype: torch.dtype,
    pool_dtype: torch.dtype,
    seed: int,
) -> None:
    device = _device()
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(num_tokens, kv, d, generator=gen) * 3).to(in_dtype).to(device)
    v = torch.randn(num_tokens, kv, d, generator=gen).to(in_dtype).to(device)
    if num_tokens > 1:
        v[1] = 0  # an all-zero head: scale 1e-8, zeros
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens].to(device)  # scattered, distinct
    pools = _pools(num_slots, kv, d, pool_dtype, device)
    expected = [p.clone() for p in pools]
    store_kv(k, v, *pools, slots=slots) if len(pools) == 2 else store_kv(
        k, v, pools[0], pools[1], slots, k_scale=pools[2], v_scale=pools[3]
    )

    if pool_dtype == torch.int8:
        kq, ks = quantize_int8(k)
        vq, vs = quantize_int8(v)
        updates = [kq, vq, ks, vs]
    else:
        updates = [k.to(pool_dtype), v.to(pool_dtype)]
    for pool, update in zip(expected, updates, strict=True):
        pool.index_copy_(0, slots, update)
    # Bit for bit, NaN in untouched slots included.
    for got, want in zip(pools, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("in_dtype", "pool_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.int8),
        (torch.float32, torch.int8),
    ],
)
def test_store_kv_matches_torch(in_dtype: torch.dtype, pool_dtype: torch.dtype) -> None:
    _check(num_tokens=7, kv=3, d=24, num_slots=40, in_dtype=in_dtype, pool_dtype=pool_dtype, seed=0)


def test_store_kv_strided_input() -> None:
    # k and v as views of a packed qkv projection: rows are not contiguous.
    num_tokens, heads, kv, d = 5, 4, 2, 16
    qkv = torch.randn(num_tokens, (heads + 2 * kv) * d, dtype=torch.bfloat16, device=_device())
    _, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
    k, v = k.view(num_tokens, kv, d), v.view(num_tokens, kv, d)
    k_pool, v_pool, k_scale, v_scale = _pools(9, kv, d, torch.int8, _device())
    slots = torch.tensor([8, 0, 3, 6, 1], device=_device())
    store_kv(k, v, k_pool, v_pool, slots, k_scale=k_scale, v_scale=v_scale)
    kq, ks = quantize_int8(k)
    assert torch.equal(k_pool[slots], kq) and torch.equal(k_scale[slots], ks)
    vq, vs = quantize_int8(v)
    assert torch.equal(v_pool[slots], vq) and torch.equal(v_scale[slots], vs)


def test_store_kv_rejects_bad_inputs() -> None:
    k = torch.randn(3, 2, 8)
    pool = torch.zeros(5, 2, 8)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="k_pool must be"):
        store_kv(k, k, torch.zeros(5, 2, 4), torch.zeros(5, 2, 4), slots)
    with pytest.raises(ValueError, match="slots must be"):
        store_kv(k, k, pool, pool, slots.float())
    with pytest.raises(ValueError, match="needs k_scale"):
        store_kv(k, k, pool.to(torch.int8), pool.to(torch.int8), slots)
    with pytest.raises(ValueError, match="only for int8"):
        store_kv(k, k, pool, pool, slots, k_scale=torch.zeros(5, 2), v_scale=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="shapes differ"):
        store_kv(k, k[:2], pool, pool, slots)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize(
    ("num_tokens", "kv", "d"), [(1, 8, 128), (8192, 8, 128), (777, 4, 64), (300, 32, 128)]
)
def test_store_kv_gpu(num_tokens: int, kv: int, d: int, pool_dtype: torch.dtype) -> None:
    in_dtype = torch.float16 if pool_dtype == torch.float16 else torch.bfloat16
    _check(num_tokens, kv, d, num_slots=20000, in_dtype=in_dtype, pool_dtype=pool_dtype, seed=num_tokens)
