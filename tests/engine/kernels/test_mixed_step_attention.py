"""A packed step's attention through the Triton kernels (`triton_attention`), as the layers run
it on a GPU: the step's leading one-token sequences (the running decodes) take the decode
kernel, the other sequences the prefill kernel, eagerly and as a prefill graph stages it.
Checked against the few-line torch reference of the prefill kernel's tests, over a pool whose
unused slots are NaN, into outputs that start as NaN. Without CUDA, under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from engine.layers.attention import triton_attention
from engine.messages import SeqStep
from engine.worker.cuda_graphs import PrefillGraphs
from engine.worker.forward_context import KVPool, build_forward_context
from tests.engine.kernels.test_prefill_attention import DEVICE, Case, tolerance

# (cached prefix, new tokens): three running decodes first, then a fresh prompt, a chunk after a
# cached prefix, a one-token chunk that does not lead (the prefill kernel's), another chunk.
MIXED = [(40, 1), (9, 1), (25, 1), (0, 37), (20, 5), (7, 1), (33, 18)]
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32


def _pool(case: Case) -> KVPool:  # the case's pool as the model runner holds it (one layer)
    return KVPool(
        k=[case.k_pool], v=[case.v_pool],
        k_scale=None if case.k_scale is None else [case.k_scale],
        v_scale=None if case.v_scale is None else [case.v_scale],
    )


def _eager(case: Case, decode_rows: int = 3) -> torch.Tensor:
    ctx = build_forward_context(
        _pool(case), case.req_to_token, case.req_indices.tolist(), [s for s, _ in case.seqs],
        [n for _, n in case.seqs], torch.zeros(case.q.shape[0], dtype=torch.int64),
    )
    assert ctx.decode_rows == decode_rows and not ctx.is_decode_only
    return triton_attention(
        ctx, case.q, case.k_pool, case.v_pool, case.scale, sliding_window=case.window, k_scale=case.k_scale,
        v_scale=case.v_scale, alibi_slopes=case.alibi_slopes,
    )


@pytest.mark.parametrize(
    ("int8", "window", "alibi"),
    [(False, None, False), (True, None, False), (False, 12, False), (False, None, True), (True, None, True)],
)
def test_leading_decodes_take_the_decode_kernel_eagerly(
    int8: bool, window: int | None, alibi: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = Case(MIXED, HEADS, KV_HEADS, HEAD_DIM, torch.float32, int8=int8, window=window, alibi=alibi).to(DEVICE)
    # The output the two launches share starts as NaN: a row neither writes fails.
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    torch.testing.assert_close(_eager(case), case.reference(), **tolerance(torch.float32))


@pytest.mark.parametrize(("int8", "alibi"), [(False, False), (True, False), (False, True), (True, True)])
def test_a_staged_graph_step_matches_the_eager_one(int8: bool, alibi: bool) -> None:
    case = Case(MIXED, HEADS, KV_HEADS, HEAD_DIM, torch.float32, int8=int8, alibi=alibi).to(DEVICE)
    num_tokens = case.q.shape[0]
    seqs = []
    for i, (start, n) in enumerate(case.seqs):
        row = int(case.req_indices[i])
        slots = case.req_to_token[row, start : start + n].tolist()
        seqs.append(SeqStep(row=row, start_pos=start, token_ids=[5] * n, out_slots=slots, sample=True))
    graphs = PrefillGraphs(
        torch.nn.Identity(), _pool(case), case.req_to_token, torch.zeros(16, dtype=torch.int64, device=DEVICE),
        max_tokens=128, max_seqs=case.req_to_token.shape[0], max_model_len=case.req_to_token.shape[1],
    )
    graphs._graphs = dict.fromkeys(graphs.buckets)  # as if captured
    bucket = graphs.bucket_for(seqs)
    assert bucket is not None and bucket >= num_tokens
    assert graphs._stage(seqs, bucket) == num_tokens
    graphs._static.copy_(graphs._host)
    ctx = graphs._context(bucket)
    assert ctx.decode_rows == min(bucket, len(case.req_to_token))  # sized for the bucket
    decode_lens = ctx.decode_seq_lens.tolist()
    assert decode_lens[:4] == [41, 10, 26, 0] and not any(decode_lens[4:])  # the leading decodes only
    tile_seqs = [s for s in ctx.prefill_tiles[0].tolist() if s >= 0]
    assert sorted(set(tile_seqs)) == [3, 4, 5, 6]  # no tiles for the decodes

    gen = torch.Generator().manual_seed(1)
    padding = torch.randn(bucket - num_tokens, HEADS, HEAD_DIM, generator=gen).to(DEVICE)
    q = torch.cat([case.q, padding])
    out = triton_attention(ctx, q, case.k_pool, case.v_pool, case.scale, k_scale=case.k_scale, v_scale=case.v_scale,
                           alibi_slopes=case.alibi_slopes)
    torch.testing.assert_close(out[:num_tokens], case.reference(), **tolerance(torch.float32))
    assert (out[num_tokens:] == 0).all()  # padding rows: zeros, not garbage
    torch.testing.assert_close(out[:num_tokens], _eager(case), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "int8", "alibi"),
    [(torch.bfloat16, False, False), (torch.float16, False, False), (torch.bfloat16, True, False),
     (torch.bfloat16, False, True), (torch.bfloat16, True, True)],
)
def test_gpu_real_shapes(dtype: torch.dtype, int8: bool, alibi: bool) -> None:
    # offline1000's steady state at the 8B shape: 200 running decodes of 100-3000 keys, then
    # prompts and chunks after cached prefixes; eager, and staged for the graph of its bucket.
    gen = torch.Generator().manual_seed(0)
    decodes = [(int(s), 1) for s in torch.randint(100, 3000, (200,), generator=gen)]
    seqs = decodes + [(0, 600), (0, 129), (700, 300), (50, 1), (0, 17)]
    case = Case(seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, int8=int8, alibi=alibi).to("cuda")
    reference = case.reference()
    torch.testing.assert_close(_eager(case, decode_rows=200), reference, atol=1e-2, rtol=1e-2)
    num_tokens = case.q.shape[0]
    seqs_steps = [
        SeqStep(row=int(case.req_indices[i]), start_pos=s, token_ids=[5] * n,
                out_slots=case.req_to_token[int(case.req_indices[i]), s : s + n].tolist(), sample=True)
        for i, (s, n) in enumerate(case.seqs)
    ]
    graphs = PrefillGraphs(
        torch.nn.Identity(), _pool(case), case.req_to_token, torch.zeros(1, dtype=torch.int64, device="cuda"),
        max_tokens=2048, max_seqs=case.req_to_token.shape[0], max_model_len=case.req_to_token.shape[1],
    )
    graphs._graphs = dict.fromkeys(graphs.buckets)
    bucket = graphs.bucket_for(seqs_steps)
    assert bucket is not None
    graphs._stage(seqs_steps, bucket)
    graphs._static.copy_(graphs._host)
    q = torch.cat([case.q, torch.randn(bucket - num_tokens, 32, 128, device="cuda").to(dtype)])
    out = triton_attention(graphs._context(bucket), q, case.k_pool, case.v_pool, case.scale, k_scale=case.k_scale,
                           v_scale=case.v_scale, alibi_slopes=case.alibi_slopes)
    torch.testing.assert_close(out[:num_tokens], reference, atol=1e-2, rtol=1e-2)
    assert (out[num_tokens:] == 0).all()
