"""Tensor-parallel linear / embedding layers: the rank shards put back together equal the full layer."""

from __future__ import annotations

import pytest
import torch

from engine.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

TP = 2


def test_column_and_row_shards_compose_to_full_mlp() -> None:
    x = torch.randn(3, 8)
    w1, b1, w2, b2 = torch.randn(6, 8), torch.randn(6), torch.randn(5, 6), torch.randn(5)
    full = torch.nn.functional.linear(torch.nn.functional.linear(x, w1, b1), w2, b2)
    total = torch.zeros(3, 5)
    for rank in range(TP):
        col = ColumnParallelLinear(8, 6, bias=True, tp_rank=rank, tp_size=TP)
        row = RowParallelLinear(6, 5, bias=True, tp_rank=rank, tp_size=TP)
        for layer, w, b in ((col, w1, b1), (row, w2, b2)):
            layer.weight.weight_loader(layer.weight, w)
            layer.bias.weight_loader(layer.bias, b)
        total += row(col(x))  # the all-reduce of the row layer's partial sums
    torch.testing.assert_close(total, full)


def test_merged_column_keeps_gate_and_up_per_rank() -> None:
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    for rank in range(TP):
        layer = MergedColumnParallelLinear(3, [4, 4], tp_rank=rank, tp_size=TP)
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        expected = torch.cat([gate[rank * 2 : rank * 2 + 2], up[rank * 2 : rank * 2 + 2]])
        assert torch.equal(layer.weight.data, expected)


def test_qkv_shards_and_replicates_kv_heads() -> None:
    head, heads, kv_heads = 2, 4, 1
    q, k, v = torch.randn(heads * head, 3), torch.randn(kv_heads * head, 3), torch.randn(kv_heads * head, 3)
    for rank in range(TP):
        layer = QKVParallelLinear(3, head, heads, kv_heads, tp_rank=rank, tp_size=TP)
        assert (layer.num_heads, layer.num_kv_heads, layer.num_kv_head_replicas) == (2, 1, 2)
        for shard_id, w in zip("qkv", (q, k, v), strict=True):
            layer.weight.weight_loader(layer.weight, w, shard_id)
        expected = torch.cat([q[rank * 4 : rank * 4 + 4], k, v])  # the single kv head on both ranks
        assert torch.equal(layer.weight.data, expected)
    single = QKVParallelLinear(3, head, heads, kv_heads, bias=True)
    assert single.weight.shape == (12, 3) and (single.q_size, single.kv_size) == (8, 2)


def test_vocab_parallel_embedding_shards_sum_to_full() -> None:
    vocab, dim = 7, 3  # not divisible by TP: the last shard is padded
    table = torch.randn(vocab, dim)
    ids = torch.tensor([0, 3, 4, 6])
    total = torch.zeros(4, dim)
    for rank in range(TP):
        emb = VocabParallelEmbedding(vocab, dim, tp_rank=rank, tp_size=TP)
        emb.weight.weight_loader(emb.weight, table)
        total += emb(ids)
    torch.testing.assert_close(total, table[ids])


def test_lm_head_tied_and_replicated() -> None:
    emb = VocabParallelEmbedding(10, 4)
    emb.weight.weight_loader(emb.weight, torch.randn(10, 4))
    head = ParallelLMHead(10, 4)
    head.tie_weights(emb)
    hidden = torch.randn(2, 4)
    torch.testing.assert_close(head(hidden), hidden @ emb.weight.T)
    rep = ReplicatedLinear(4, 3, bias=False)
    rep.weight.weight_loader(rep.weight, torch.eye(3, 4))
    assert torch.equal(rep(hidden), hidden[:, :3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_cpu_weights_give_the_same_products(dtype: torch.dtype) -> None:
    from engine.layers import cpu_gemm

    torch.manual_seed(0)
    layer = ReplicatedLinear(48, 80, bias=True, params_dtype=dtype)
    layer.weight.data.copy_(torch.randn(80, 48))
    assert layer.bias is not None
    layer.bias.data.copy_(torch.randn(80))
    if not cpu_gemm.can_pack(layer.weight):
        pytest.skip("this torch build has no oneDNN packing for this dtype")
    for rows in (1, 5, 33):
        x = torch.randn(rows, 48, dtype=dtype)
        expected = layer(x)
        assert cpu_gemm.pack_model_weights(layer) == 1
        got = layer(x)
        layer.packed_weight = None
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # float32: only the summation order differs
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_decode_gemv_setting_takes_only_few_row_products_with_triton() -> None:
    """`decode_gemv` sends products of 1..MAX_ROWS rows to the GEMV only with the Triton backend
    (CUDA); on the CPU, with the setting on, a layer computes exactly what it computed before."""
    import importlib.util

    from engine.layers.backend import select_backend, use_decode_gemv

    layer = ColumnParallelLinear(8, 6, bias=True)
    w, b = torch.randn(6, 8), torch.randn(6)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, b)  # type: ignore[union-attr]
    x = torch.randn(1, 8)
    try:
        select_backend("cpu", "auto", decode_gemv=True)
        assert not use_decode_gemv(1)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, w, b))
        if importlib.util.find_spec("triton") is None:
            return
        select_backend("cuda", "torch", decode_gemv=True)
        assert not use_decode_gemv(1)
        select_backend("cuda", "auto", decode_gemv=False)
        assert not use_decode_gemv(1)
        select_backend("cuda", "auto", decode_gemv=True)
        assert use_decode_gemv(1) and use_decode_gemv(8)
        assert not use_decode_gemv(0) and not use_decode_gemv(9)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, w, b))  # CPU tensors: the CPU path
    finally:
        select_backend("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_gemv_setting_routes_bf16_and_fp8_layers() -> None:
    """On CUDA with the setting on, 1..8 rows take the GEMV kernels (the same bits as calling
    them), 9 rows the cuBLAS path (F.linear / fp8_linear's scaled product)."""
    from engine.kernels.gemv import fp8_gemv, gemv
    from engine.layers.backend import select_backend
    from engine.layers.fp8 import fp8_linear, quantize_fp8_rows

    layer = RowParallelLinear(4096, 1024, bias=True, params_dtype=torch.bfloat16).cuda()
    layer.weight.data.normal_(0, 0.02)
    layer.bias.data.normal_()  # type: ignore[union-attr]
    w, b = layer.weight.data.clone(), layer.bias.data.clone()  # type: ignore[union-attr]
    try:
        select_backend("cuda", "auto", decode_gemv=True)
        for rows in (1, 8, 9):
            x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
            want = gemv(x, w, b) if rows <= 8 else torch.nn.functional.linear(x, w, b)
            assert torch.equal(layer(x), want)
        wq, ws = quantize_fp8_rows(w)
        layer.weight = torch.nn.Parameter(wq, requires_grad=False)
        layer.weight_scale = ws
        for rows in (1, 8, 9):
            x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
            select_backend("cuda", "auto", decode_gemv=False)
            cublas = fp8_linear(x, wq, ws, b)
            select_backend("cuda", "auto", decode_gemv=True)
            want = fp8_gemv(x, wq, ws, b) if rows <= 8 else cublas
            assert torch.equal(layer(x), want)
    finally:
        select_backend("cpu")
