"""fused_experts (and its alignment) against engine.layers.moe.fused_experts_torch."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.fused_moe import fused_experts, moe_align
from engine.layers.moe import Routing, fused_experts_torch, select_experts


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    device = _device()  # drawn on the device: the real shapes' weights are gigabytes
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, device=device)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=device) / inter**0.5
    logits = 2 * torch.randn(num_tokens, num_experts, generator=gen, device=device)
    weights, ids = select_experts(logits, Routing(top_k, renormalize=True))
    return x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def test_align_groups_pairs_by_expert_in_padded_blocks() -> None:
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 1], [3, 2]], device=_device())  # pairs 0..9
    sorted_pairs, block_expert = moe_align(ids, num_experts=5, block_m=4)
    n = ids.numel()
    # a bound fixed by the shapes: 10 pairs + min(10, 5 experts) * 3 padding rows -> 7 blocks of 4
    assert sorted_pairs.shape == (28,) and block_expert.shape == (7,)
    rows = sorted_pairs.view(-1, 4).tolist()
    assert rows[:5] == [[1, 4, n, n], [7, n, n, n], [0, 2, 5, 6], [9, n, n, n], [3, 8, n, n]]
    assert rows[5:] == [[n] * 4] * 2
    assert block_expert.tolist() == [0, 1, 2, 2, 3, 5, 5]  # expert 4 has none; 5: past the last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "hidden", "inter"),
    # blocks of 16, 32 and 64 rows (200 tokens on 4 experts); experts left without tokens
    [(1, 8, 2, 32, 48), (13, 8, 2, 64, 40), (70, 16, 4, 48, 24), (5, 32, 3, 32, 16), (200, 4, 2, 32, 16)],
)
def test_fused_experts_matches_torch(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype
) -> None:
    x, w13, w2, weights, ids = _inputs(num_tokens, num_experts, top_k, hidden, inter, dtype, seed=num_tokens)
    got = fused_experts(x, w13, w2, weights, ids)
    expected = fused_experts_torch(x, w13, w2, weights, ids)
    assert got.dtype == dtype and got.shape == (num_tokens, hidden)
    assert _rel_err(got, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_torch_path_equals_every_expert_on_every_token() -> None:
    """The grouped CPU path against a dense product of every expert, masked to the chosen ones."""
    x, w13, w2, weights, ids = (t.cpu() for t in _inputs(9, 6, 2, 16, 12, torch.float32, seed=3))
    dense = torch.zeros_like(x)
    for e in range(6):
        gate, up = (x @ w13[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        dense += y * (weights * (ids == e)).sum(dim=1, keepdim=True)
    torch.testing.assert_close(fused_experts_torch(x, w13, w2, weights, ids), dense, rtol=1e-5, atol=1e-5)


def test_fused_experts_empty_batch_and_bad_shapes() -> None:
    x, w13, w2, weights, ids = _inputs(3, 4, 2, 16, 8, torch.float32)
    assert fused_experts(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 16)
    with pytest.raises(ValueError, match="w13 must be"):
        fused_experts(x, w13[:, :8], w2, weights, ids)
    with pytest.raises(ValueError, match="ids and weights"):
        fused_experts(x, w13, w2, weights[:2], ids)


def test_routing_renormalises_and_scales() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs = torch.softmax(logits, dim=-1)
    weights, ids = select_experts(logits, Routing(2, renormalize=False))
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, probs[:, [1, 2]])
    weights, _ = select_experts(logits, Routing(2, renormalize=True, routed_scaling_factor=2.5))
    torch.testing.assert_close(weights, 2.5 * probs[:, [1, 2]] / probs[:, [1, 2]].sum())


def test_grouped_routing_picks_within_the_best_groups() -> None:
    """DeepSeek-V2's group_limited_greedy: 3 groups of 2 experts scored by their best expert;
    the top 2 come from the best 2 groups only, even where an expert outside them scores more."""
    probs = torch.tensor([[0.30, 0.01, 0.20, 0.19, 0.25, 0.05]])  # group maxima 0.30, 0.20, 0.25
    logits = probs.log()
    weights, ids = select_experts(logits, Routing(3, renormalize=False, num_groups=3, topk_groups=2))
    assert sorted(ids[0].tolist()) == [0, 4, 5]  # not 2 (0.20 > 0.05, but its group lost)
    weights, ids = select_experts(logits, Routing(2, False, 16.0, num_groups=3, topk_groups=1))
    assert sorted(ids[0].tolist()) == [0, 1]  # group 0 only, its weak expert included
    torch.testing.assert_close(weights.sort(descending=True).values, 16.0 * probs[:, [0, 1]])
    greedy_weights, greedy_ids = select_experts(logits, Routing(2, False, 16.0, num_groups=3, topk_groups=3))
    assert sorted(greedy_ids[0].tolist()) == [0, 4]  # every group: the plain top-k


def test_routing_refuses_groups_that_cannot_hold_top_k() -> None:
    with pytest.raises(ValueError, match="1 <= topk_group <= n_group"):
        Routing(2, False, num_groups=2, topk_groups=3)
    with pytest.raises(ValueError, match="does not divide"):
        Routing(2, False, num_groups=3, topk_groups=1).check_experts(8)
    with pytest.raises(ValueError, match="exceeds"):
        Routing(3, False, num_groups=4, topk_groups=1).check_experts(8)


# Real shapes: Mixtral-8x7B (8 experts, top 2, H 4096, I 14336), Qwen3-30B-A3B (128 experts,
# top 8, H 2048, I 768) and DeepSeek-V2-Lite (64 experts, top 6, H 2048, I 1408), bf16, from one
# decode token to a prefill chunk.
_REAL = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768),
         "deepseek-v2-lite": (64, 6, 2048, 1408)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 1024])
@pytest.mark.parametrize("model", sorted(_REAL))
def test_fused_experts_gpu_real_shapes(model: str, num_tokens: int) -> None:
    num_experts, top_k, hidden, inter = _REAL[model]
    x, w13, w2, weights, ids = _inputs(num_tokens, num_experts, top_k, hidden, inter, torch.bfloat16)
    got = fused_experts(x, w13, w2, weights, ids)
    assert _rel_err(got, fused_experts_torch(x, w13, w2, weights, ids)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_experts_replays_in_a_cuda_graph() -> None:
    """Captured once, replayed with other tokens and other routing: the eager result each time."""
    num_experts, top_k, hidden, inter = _REAL["qwen3-30b-a3b"]
    x, w13, w2, weights, ids = _inputs(16, num_experts, top_k, hidden, inter, torch.bfloat16, seed=1)
    fused_experts(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    for seed in (2, 3):
        x2, _, _, weights2, ids2 = _inputs(16, num_experts, top_k, hidden, inter, torch.bfloat16, seed=seed)
        x.copy_(x2), weights.copy_(weights2), ids.copy_(ids2)
        graph.replay()
        torch.testing.assert_close(out, fused_experts(x, w13, w2, weights, ids), rtol=0, atol=0)
