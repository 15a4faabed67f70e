"""exponential_race against the sampler's torch path: softmax(logits / t) / Exp(1) noise, argmax."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.exponential_race import exponential_race
from engine.worker.race import exponential_noise


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reference_scores(logits: torch.Tensor, temps: list[float], seeds: list[int]) -> torch.Tensor:
    probs = torch.softmax(logits.cpu() / torch.tensor(temps).unsqueeze(1), dim=-1)
    return probs / exponential_noise(seeds, logits.shape[1], torch.device("cpu"))


def _check(logits: torch.Tensor, temps: list[float], seeds: list[int]) -> torch.Tensor:
    device = logits.device
    got = exponential_race(logits, torch.tensor(temps, device=device), torch.tensor(seeds, device=device)).cpu()
    scores = _reference_scores(logits, temps, seeds)
    want = scores.argmax(dim=-1)
    for row in range(logits.shape[0]):
        if got[row] != want[row]:  # the two round differently: only a near-tie may go the other way
            best, picked = scores[row, want[row]].item(), scores[row, got[row]].item()
            assert picked >= best * (1 - 1e-5), (row, got[row].item(), want[row].item(), picked, best)
    return got


@pytest.mark.parametrize("vocab", [1500, 64])  # 1500: two blocks, the second masked at its end
def test_race_matches_the_torch_path(vocab: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, vocab, generator=gen)).to(_device())
    seeds = [0, 1, -5, 2**62 + 12345, -(2**63), 987654321]  # the full int64 range, negative too
    got = _check(logits, [1.0, 0.7, 1.3, 0.25, 1.0, 2.0], seeds)
    assert ((0 <= got) & (got < vocab)).all()


def test_race_never_picks_a_masked_token_and_follows_its_seed() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3000, generator=gen)
    logits[1] = logits[0]
    logits[:, 50:] = float("-inf")  # a top-k of 50
    logits[3, 1:] = float("-inf")  # a nucleus of one token
    logits = logits.to(_device())
    got = _check(logits, [1.0] * 4, [7, 7, 8, 9])
    assert (got < 50).all() and got[3] == 0
    assert got[0] == got[1]  # same seed, same logits: same token
    # the draw follows the distribution: over many seeds, a token twice as likely wins ~twice as often
    flat = torch.log(torch.tensor([[2.0, 1.0, 1.0]])).repeat(4000, 1).to(_device())
    draws = exponential_race(flat, torch.ones(4000, device=flat.device), torch.arange(4000, device=flat.device)).cpu()
    share = (draws == 0).float().mean().item()
    assert 0.46 < share < 0.54, share


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.8},
        {"temperature": 1.0, "top_k": 20},
        {"temperature": 0.7, "top_p": 0.9},
        {"temperature": 1.3, "top_k": 50, "top_p": 0.8},
        {"temperature": 0.9, "min_p": 0.05},
        {"temperature": 0.9, "min_p": 0.1, "top_k": 30, "seed": 4},
        {"temperature": 1.0, "top_k": 2**31 + 5, "top_p": 0.9},  # past int32: all of the vocabulary
    ],
)
def test_sampler_draws_the_same_tokens_fused(kwargs: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.worker.sampler as sampler_module
    from engine.sampling_params import SamplingParams
    from engine.worker.sampler import Sampler
    from engine.worker.sampling_state import SamplingState

    params = SamplingParams(**kwargs)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(8, 700, generator=gen)).to(_device())
    draws = {}
    # the torch path; the race kernel with thresholds from the sort, then from the search kernel
    for fused, search_min_rows in ((False, 1), (True, 10**9), (True, 1)):
        monkeypatch.setattr(sampler_module, "FUSED_RACE", fused)
        monkeypatch.setattr(sampler_module, "SEARCH_MIN_ROWS", search_min_rows)
        monkeypatch.setattr(sampler_module, "use_triton", lambda: True)
        sampler = Sampler(seed=0)  # the same unseeded draws for all
        states = [SamplingState(params, [1]) for _ in range(8)]
        draws[fused, search_min_rows] = [sampler.sample(logits, states).token_ids for _ in range(3)]
    assert draws[True, 10**9] == draws[False, 1]
    assert draws[True, 1] == draws[False, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 64, 1024])
def test_race_gpu_at_the_8b_vocabulary(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    logits = 3 * torch.randn(rows, 128256, generator=gen)
    logits[::3, 1000:] = float("-inf")  # every third row masked past its first 1000 ids
    seeds = [int(s) for s in torch.randint(-(2**62), 2**62, (rows,), generator=gen)]
    temps = [0.5 + (i % 4) * 0.3 for i in range(rows)]
    got = _check(logits.cuda(), temps, seeds)
    assert (got[::3] < 1000).all()
