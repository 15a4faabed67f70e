"""What a prefill CUDA graph reads, checked on the host: `PrefillGraphs` stages a step into its
static buffers (padded to the token bucket, a tile table for the attention launch), and the
prefill attention kernel over that staging gives the eager step's result, zeros on the padding.

The graphs themselves need a GPU (tests/engine/test_gpu.py); the staging and the tile-table
launch do not: here they run under the Triton interpreter when there is no GPU.
"""

from __future__ import annotations

import math

import torch

from engine.kernels.prefill_attention import prefill_attention
from engine.messages import SeqStep
from engine.worker.cuda_graphs import PrefillGraphs
from engine.worker.forward_context import KVPool, build_forward_context

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KV_HEADS, HEADS, HEAD_DIM, MAX_LEN = 2, 4, 16, 64


def test_staged_step_matches_the_eager_metadata_and_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    num_slots = 160
    kv = KVPool(
        k=[torch.randn(num_slots + 1, KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE)],
        v=[torch.randn(num_slots + 1, KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE)],
    )
    req_to_token = torch.full((4, MAX_LEN), kv.dummy_slot, dtype=torch.int32)
    slots = iter(torch.randperm(num_slots, generator=gen).tolist())
    # (row, cached prefix, new tokens): a fresh prompt over two 16-row tiles, a chunk after a
    # cached prefix, and one token whose id is a placeholder (the previous step's sample).
    shapes = [(0, 0, 20), (2, 5, 7), (1, 30, 1)]
    seqs = []
    for row, start, n in shapes:
        for pos in range(start):
            req_to_token[row, pos] = next(slots)
        out = [next(slots) for _ in range(n)]
        req_to_token[row, start : start + n] = torch.tensor(out, dtype=torch.int32)
        ids = [-1] if n == 1 else [7 + i for i in range(n)]
        seqs.append(SeqStep(row=row, start_pos=start, token_ids=ids, out_slots=out, sample=True))
    req_to_token = req_to_token.to(DEVICE)
    last_sampled = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    graphs = PrefillGraphs(torch.nn.Identity(), kv, req_to_token, last_sampled, max_tokens=64, max_seqs=4,
                           max_model_len=MAX_LEN)

    graphs._graphs = dict.fromkeys(graphs.buckets)  # as if captured: bucket_for looks for them
    bucket = graphs.bucket_for(seqs)
    assert bucket == 32
    num_tokens = graphs._stage(seqs, bucket)
    assert num_tokens == 28
    graphs._static.copy_(graphs._host)
    ctx = graphs._context(bucket)
    eager = build_forward_context(
        kv, req_to_token, [r for r, _, _ in shapes], [s for _, s, _ in shapes], [n for _, _, n in shapes],
        torch.tensor([t for s in seqs for t in s.out_slots]),
    )
    assert ctx.positions[:num_tokens].tolist() == eager.positions.tolist()
    assert ctx.out_slots[:num_tokens].tolist() == eager.out_slots.tolist()
    assert (ctx.out_slots[num_tokens:] == kv.dummy_slot).all() and (ctx.positions[num_tokens:] == 0).all()
    assert ctx.cu_new_lens.tolist() == [0, 20, 27, 28, 28]  # the padding sequence is empty
    tok_rows = graphs._tok[3, :num_tokens].tolist()  # the row of each token, for placeholders
    assert tok_rows == [0] * 20 + [2] * 7 + [1]
    assert graphs._tok[0, :num_tokens].tolist() == [t for s in seqs for t in s.token_ids]

    q = torch.randn(bucket, HEADS, HEAD_DIM, generator=gen).to(DEVICE)
    scale = 1 / math.sqrt(HEAD_DIM)
    staged = prefill_attention(
        q, kv.k[0], kv.v[0], req_to_token, ctx.req_indices, ctx.start_pos, ctx.cu_new_lens, scale,
        torch.zeros_like(q), tiles=ctx.prefill_tiles,
    )
    want = prefill_attention(
        q[:num_tokens].contiguous(), kv.k[0], kv.v[0], req_to_token, eager.req_indices, eager.start_pos,
        eager.cu_new_lens, scale, max_new_len=20,
    )
    torch.testing.assert_close(staged[:num_tokens], want, atol=1e-4, rtol=1e-4)
    assert (staged[num_tokens:] == 0).all()

    # A smaller next step: the previous step's entries go back to padding.
    assert graphs.bucket_for(seqs[1:]) == 16
    num_tokens = graphs._stage(seqs[1:], 16)
    assert num_tokens == 8
    assert (graphs._tok_np[2, 8:] == kv.dummy_slot).all() and (graphs._tiles_np[0, 2:] == -1).all()
    assert graphs._seq_np[4, :5].tolist() == [0, 7, 8, 8, 8]


def test_a_step_takes_the_smallest_bucket_whose_tile_table_holds_it() -> None:
    kv = KVPool(k=[torch.zeros(9, 1, HEAD_DIM)], v=[torch.zeros(9, 1, HEAD_DIM)])
    req_to_token = torch.zeros(64, 256, dtype=torch.int32)
    graphs = PrefillGraphs(torch.nn.Identity(), kv, req_to_token, torch.zeros(64, dtype=torch.int64),
                           max_tokens=256, max_seqs=64, max_model_len=256)
    assert graphs.bucket_for([_seq(10)]) is None  # nothing captured
    graphs._graphs = dict.fromkeys(graphs.buckets)
    block = graphs.block_m
    assert graphs.bucket_for([_seq(10)]) == 16
    assert graphs.bucket_for([_seq(block + 1)]) == 32  # tokens decide
    # Leading one-token rows (decodes) take the decode launch, no tiles; 40 one-token rows after
    # a prompt need 40 tiles more: the 64-token bucket's table holds 4 + 32 (its query blocks
    # plus 32 partial ones), the 128-token bucket's 8 + 32, the 256-token bucket's 16 + 32.
    assert graphs.bucket_for([_seq(1)] * 40) == 64
    assert graphs.bucket_for([_seq(1)] * 40 + [_seq(3)]) == 64
    assert graphs.bucket_for([_seq(3)] + [_seq(1)] * 40) == 256
    assert graphs.bucket_for([_seq(180)] + [_seq(1)] * 60) is None  # more tiles than any table: eager
    assert graphs.bucket_for([_seq(257)]) is None  # more tokens than the largest bucket
    assert graphs.bucket_for([_seq(1)] * 65) is None  # more sequences than the tables' sequence rows


def _seq(n: int) -> SeqStep:
    return SeqStep(row=0, start_pos=0, token_ids=[1] * n, out_slots=[0] * n, sample=True)
