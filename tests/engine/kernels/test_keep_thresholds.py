"""keep_thresholds (the Triton search) against the sampler's sort-based reference."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.keep_thresholds import keep_thresholds
from engine.worker.sampler import keep_thresholds as reference_thresholds


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _mass_above(x: torch.Tensor, value: float, k: int) -> float:
    """The probability mass strictly above `value` in the distribution top-k leaves of row x."""
    kept = x if k <= 0 or k >= x.numel() else x.masked_fill(x < x.topk(k).values[-1], float("-inf"))
    probs = kept.double().softmax(dim=-1)
    return probs[kept > value].sum().item()


def _check(logits: torch.Tensor, temps: list[float], ks: list[int], ps: list[float], ms: list[float]) -> torch.Tensor:
    device = logits.device
    got = keep_thresholds(
        logits, torch.tensor(temps, device=device), torch.tensor(ks, dtype=torch.int32, device=device),
        torch.tensor(ps, device=device), torch.tensor(ms, device=device),
    ).cpu()
    tempered = logits.cpu() / torch.tensor(temps).unsqueeze(1)
    want = reference_thresholds(tempered, ks, ps, ms)
    for row in range(logits.shape[0]):
        # the same tokens kept (a row that keeps all may say -inf or its minimum); the two sum the
        # mass in different orders: only a near-tie of the nucleus' mass with p may go the other way
        if not torch.equal(tempered[row] >= got[row], tempered[row] >= want[row]):
            near = [_mass_above(tempered[row], v, ks[row]) for v in (got[row].item(), want[row].item())]
            assert ps[row] < 1.0 and min(abs(m - ps[row]) for m in near) < 1e-5, (row, got[row], want[row], near)
    return got


@pytest.mark.parametrize(("vocab", "ways"), [(700, 8), (1500, 8), (700, 4), (700, 16)])  # 1500: the last block of
# each pass partly padding; 4 ways: more passes, each narrowing less
def test_thresholds_match_the_sorted_reference(vocab: int, ways: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.kernels.keep_thresholds as module

    monkeypatch.setattr(module, "_WAYS", ways)
    gen = torch.Generator().manual_seed(vocab)
    logits = 3 * torch.randn(10, vocab, generator=gen)
    logits[2, 100:] = float("-inf")  # masked before the filters (logit_bias, min_tokens)
    logits[3] = logits[3].clamp(max=8.0)
    logits[3, :4] = torch.tensor([14.0, 13.0, 12.0, 11.0])
    logits[3, 4:50] = 9.0  # the 5th value, 46 times
    logits[4] = -logits[4].abs() - 1  # all negative: keys with the sign bit set
    logits[5, :20] = 0.0
    logits[5, 20:40] = -0.0  # both zeros are one value
    temps = [1.0, 0.7, 1.3, 0.5, 1.0, 2.0, 1.0, 0.9, 0.25, 1.0]
    ks = [0, 20, 50, 5, 0, vocab, 1, 30, 3, 21]
    ps = [0.9, 1.0, 0.8, 1.0, 0.999, 0.3, 1.0, 0.95, 1e-6, 0.5]
    ms = [0.0, 0.05, 0.0, 0.0, 0.1, 0.0, 0.0, 0.2, 0.0, 1.0]
    got = _check(logits.to(_device()), temps, ks, ps, ms)
    tempered = logits / torch.tensor(temps).unsqueeze(1)
    assert got[6] == tempered[6].max()  # top_k 1
    assert got[8] == tempered[8].max()  # a nucleus of one token
    assert (tempered[3] >= got[3]).sum() == 50  # top_k 5 at a value 46 tokens share: all of them stay
    assert got[9] == tempered[9].max()  # min_p 1: the maximum alone


def test_rows_without_filters_or_tokens_keep_everything() -> None:
    logits = torch.randn(3, 300)
    logits[1] = float("-inf")  # nothing to keep
    got = _check(logits.to(_device()), [1.0] * 3, [0, 5, 300], [1.0, 0.5, 1.0], [0.0, 0.1, 0.0])
    assert torch.isinf(got).all() and (got < 0).all()


def test_a_tie_at_the_nucleus_boundary_stays_in() -> None:
    # probabilities 0.4, 0.2, 0.2, 0.2: a nucleus of 0.5 needs the second token, so its equals stay too
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    got = _check(logits.to(_device()), [1.0], [0], [0.5], [0.0])
    assert got[0] == logits[0, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 64, 1024])
def test_thresholds_gpu_at_the_8b_vocabulary(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    logits = 4 * torch.randn(rows, 128256, generator=gen)
    logits[::5, 2000:] = float("-inf")
    temps = [0.5 + (i % 4) * 0.3 for i in range(rows)]
    ks = [(0, 1, 40, 1000, 128256)[i % 5] for i in range(rows)]
    ps = [(1.0, 0.9, 0.5, 0.99, 0.95, 1e-6)[i % 6] for i in range(rows)]
    ms = [(0.0, 0.05, 0.0)[i % 3] for i in range(rows)]
    _check(logits.cuda(), temps, ks, ps, ms)
