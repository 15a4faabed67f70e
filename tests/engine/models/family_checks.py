"""The checks every model family passes against transformers (fp32, CPU, random weights).

A family's test module defines a module- or session-scoped `pair` fixture giving
(transformers model, our model loaded from the same saved directory) and imports these tests
by name (`from tests.engine.models.family_checks import *`): prefill logits and 24 greedy tokens equal
transformers', chunked prefill, a packed mixed step, batched decode, int8 KV.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.engine.models.harness import Harness, rel_err

__all__ = [
    "test_batched_decode_matches_sequences_alone",
    "test_chunked_prefill_gives_same_logits",
    "test_greedy_tokens_match_transformers",
    "test_int8_kv_cache_stays_close",
    "test_mixed_step_with_leading_decodes_matches_sequences_alone",
    "test_packed_batch_matches_sequences_alone",
    "test_prefill_logits_match_transformers",
]


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def test_prefill_logits_match_transformers(pair: tuple[nn.Module, nn.Module]) -> None:
    hf, ours = pair
    prompt = _prompt(21, seed=1)
    expected = hf(torch.tensor([prompt])).logits[0]
    actual = Harness(ours).prefill(0, prompt)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert rel_err(actual, expected) < 1e-4


@torch.inference_mode()
def test_greedy_tokens_match_transformers(pair: tuple[nn.Module, nn.Module]) -> None:
    hf, ours = pair
    prompt = _prompt(9, seed=2)
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert Harness(ours).generate(prompt, 24) == expected[0, len(prompt) :].tolist()


def test_chunked_prefill_gives_same_logits(pair: tuple[nn.Module, nn.Module]) -> None:
    _, ours = pair
    prompt = _prompt(23, seed=3)
    whole = Harness(ours).prefill(0, prompt)
    chunked = Harness(ours, seed=5).prefill(0, prompt, chunk_sizes=[8, 7])
    assert rel_err(chunked, whole) < 1e-5


def test_packed_batch_matches_sequences_alone(pair: tuple[nn.Module, nn.Module]) -> None:
    _, ours = pair
    prompts = [_prompt(n, seed=10 + n) for n in (5, 13, 1, 9)]
    alone = [Harness(ours).prefill(0, p) for p in prompts]
    harness = Harness(ours)
    # Mixed step: row 0 already holds a 2-token prefix, rows 1..3 start fresh.
    harness.step([(0, prompts[0][:2])])
    packed = harness.step([(0, prompts[0][2:]), (1, prompts[1]), (2, prompts[2]), (3, prompts[3])])
    assert rel_err(packed[0], alone[0][2:]) < 1e-5
    for i in (1, 2, 3):
        assert rel_err(packed[i], alone[i]) < 1e-5


@torch.inference_mode()
def test_mixed_step_with_leading_decodes_matches_sequences_alone(pair: tuple[nn.Module, nn.Module]) -> None:
    """A step as continuous batching forms it: running sequences' one-token decodes first, then a
    prompt's next chunk and a new prompt (families may batch the leading decodes apart)."""
    _, ours = pair
    prompts = [_prompt(n, seed=30 + n) for n in (6, 10, 4, 8)]
    alone = [Harness(ours).prefill(0, p) for p in prompts]
    harness = Harness(ours)
    harness.step([(0, prompts[0][:-1]), (1, prompts[1][:-1]), (2, prompts[2][:2])])
    packed = harness.step([(0, prompts[0][-1:]), (1, prompts[1][-1:]), (2, prompts[2][2:]), (3, prompts[3])])
    for i, want in enumerate((alone[0][-1:], alone[1][-1:], alone[2][2:], alone[3])):
        assert rel_err(packed[i], want) < 1e-5, i


def test_batched_decode_matches_sequences_alone(pair: tuple[nn.Module, nn.Module]) -> None:
    _, ours = pair
    prompts = [_prompt(n, seed=20 + n) for n in (3, 11, 7)]
    steps = 4
    alone = [Harness(ours).generate(p, steps) for p in prompts]
    harness = Harness(ours)
    tokens = [[int(harness.prefill(row, p)[-1].argmax())] for row, p in enumerate(prompts)]
    for _ in range(steps - 1):
        logits = harness.step([(row, [toks[-1]]) for row, toks in enumerate(tokens)])
        for toks, lg in zip(tokens, logits, strict=True):
            toks.append(int(lg[-1].argmax()))
    assert tokens == alone


def test_int8_kv_cache_stays_close(pair: tuple[nn.Module, nn.Module]) -> None:
    _, ours = pair
    prompt = _prompt(17, seed=4)
    exact = Harness(ours).prefill(0, prompt, chunk_sizes=[9])
    int8 = Harness(ours, kv_dtype=torch.int8).prefill(0, prompt, chunk_sizes=[9])
    assert 0 < rel_err(int8, exact) < 3e-2
