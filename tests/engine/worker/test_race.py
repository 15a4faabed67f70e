"""The exponential race's torch path: its noise streams and the race over them."""

from __future__ import annotations

import torch

from engine.worker.race import exponential_noise, race, unit_interval


def test_the_race_in_pieces_draws_what_the_whole_draws() -> None:
    """On the CPU the race goes a few thousand columns at a time: the same tokens as
    argmax(probs / noise) over the whole rows, masked (zero) tokens never drawn."""
    gen = torch.Generator().manual_seed(11)
    vocab = 10_000  # two whole pieces and a short one
    probs = torch.softmax(2 * torch.randn(64, vocab, generator=gen), dim=-1)
    probs[::2, 4000:] = 0.0  # every other row keeps only the first piece and part of the second
    probs[1::4, :9000] = 0.0  # some rows keep only the last piece
    seeds = [int(s) for s in torch.randint(-(2**62), 2**62, (64,), generator=gen)]
    whole = (probs / exponential_noise(seeds, vocab, probs.device)).argmax(dim=-1)
    drawn = race(probs, seeds)
    assert torch.equal(drawn, whole)
    assert (drawn[::2] < 4000).all() and (drawn[1::4] >= 9000).all()
    # a filter's few kept tokens: only they draw noise, the same tokens again
    kept = torch.zeros_like(probs, dtype=torch.bool)
    for row in range(64):
        kept[row, torch.randperm(vocab, generator=gen)[: 1 + row % 40]] = True
    sparse = torch.softmax(2 * torch.randn(64, vocab, generator=gen), dim=-1).masked_fill(~kept, 0.0)
    whole = (sparse / exponential_noise(seeds, vocab, probs.device)).argmax(dim=-1)
    drawn = race(sparse, seeds, kept)
    assert torch.equal(drawn, whole) and kept[torch.arange(64), drawn].all()
    sparse[3] = float("nan")  # an inf logit's row: an id in range, as the whole race gives
    assert race(sparse, seeds, kept)[3] == (sparse / exponential_noise(seeds, vocab, probs.device)).argmax(dim=-1)[3]


def test_exponential_noise_is_exp1_and_depends_on_its_seed_only() -> None:
    cpu = torch.device("cpu")
    noise = exponential_noise([1, 2, 3, -5], 50000, cpu)
    assert float(noise.min()) > 0
    assert abs(float(noise.mean()) - 1.0) < 0.02 and abs(float(noise.var()) - 1.0) < 0.05
    below_median = float((noise < torch.log(torch.tensor(2.0))).float().mean())
    assert abs(below_median - 0.5) < 0.01
    assert abs(float(torch.corrcoef(noise[:2])[0, 1])) < 0.02
    assert torch.equal(exponential_noise([9, 2], 1000, cpu)[1], exponential_noise([2], 1000, cpu)[0])
    assert not torch.equal(exponential_noise([3], 1000, cpu), exponential_noise([4], 1000, cpu))


def test_unit_interval_never_reaches_zero_or_one() -> None:
    """A uniform of exactly 1 made a draw's noise 0 and its token win whatever its probability:
    a masked one too, one row in ~130 per step with a 128 k vocabulary."""
    extremes = torch.tensor([-1, 0, 2**62, -(2**63), 2**63 - 1], dtype=torch.int64)  # all ones, all zeros, ...
    uniform = unit_interval(extremes)
    assert bool(((uniform > 0) & (uniform < 1)).all()), uniform
    assert bool(torch.isfinite(uniform.log().neg().log()).all())
