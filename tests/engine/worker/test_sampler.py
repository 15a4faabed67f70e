"""Sampler and SamplingState against few-line torch references, on hand-made logits."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine.sampling_params import SamplingParams
from engine.worker.race import exponential_noise
from engine.worker.sampler import Sampler, compute_prompt_logprobs, keep_thresholds, process_logits
from engine.worker.sampling_state import PenaltyTable, SamplingState

VOCAB = 50


def make_state(
    prompt: list[int] | None = None, outputs: list[int] | None = None, **kw: object
) -> SamplingState:
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    return SamplingState(params, prompt or [], outputs or [], frozenset(params.stop_token_ids or ()))


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax() -> None:
    logits = random_logits(8)
    out = Sampler(seed=0).sample(logits, [make_state(temperature=0.0) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.sampled.tolist() == out.token_ids and out.logprobs is None


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = random_logits(6, seed=1)
    states = [make_state(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    out = Sampler(seed=0).sample(logits, states)
    greedy = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (1, 3, 5)] == [greedy[i] for i in (1, 3, 5)]


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_degenerate_filters_equal_greedy(kw: dict[str, object]) -> None:
    logits = random_logits(16, seed=2)
    sampler = Sampler(seed=0)
    for _ in range(5):
        out = sampler.sample(logits, [make_state(temperature=1.5, **kw) for _ in range(16)])
        assert out.token_ids == logits.argmax(-1).tolist()


def draw_counts(logits_row: torch.Tensor, n: int, **kw: object) -> Counter[int]:
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    return Counter(Sampler(seed=1).sample(logits, [make_state(**kw) for _ in range(n)]).token_ids)


def test_temperature_frequencies_match_softmax() -> None:
    logits_row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n, temperature = 8000, 0.7
    counts = draw_counts(logits_row, n, temperature=temperature)
    expected = torch.softmax(logits_row / temperature, -1) * n
    chi2 = sum((counts[i] - e) ** 2 / e for i, e in enumerate(expected.tolist()))
    assert chi2 < 25.0  # 4 degrees of freedom: p ≈ 5e-5 for a correct sampler


def test_top_k_top_p_min_p_keep_only_allowed_tokens() -> None:
    logits_row = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    assert set(draw_counts(logits_row, 3000, top_k=2)) == {0, 1}
    assert set(draw_counts(logits_row, 3000, top_p=0.8)) == {0, 1, 2}  # 0.4 + 0.3 < 0.8
    assert set(draw_counts(logits_row, 3000, min_p=0.3)) == {0, 1, 2}  # 0.3 * 0.4 = 0.12
    combined = draw_counts(logits_row, 3000, top_k=3, top_p=0.5)
    assert set(combined) == {0, 1}
    # top_p works on the distribution left by top_k: 0.4/0.85 < 0.5, so two tokens stay.


def test_top_p_from_the_largest_values_equals_sorting_whole_rows() -> None:
    """On the CPU top-p first looks at a row's largest values and sorts the row only when its
    nucleus may reach past them: the same tokens kept either way."""
    gen = torch.Generator().manual_seed(5)
    vocab = 3000
    logits = torch.randn(8, vocab, generator=gen)
    logits[0] *= 12  # peaked: a nucleus of a few tokens, inside the candidates
    logits[1] *= 0.1  # flat: a nucleus of thousands, past them
    logits[2, :2] = torch.tensor([9.0, 8.0])
    logits[2, 2:40] = 7.0  # the 3rd value 38 times: top_k 3 keeps them all, past the candidates
    logits[3] *= 12
    logits[4] *= 0.1
    top_ks = [0, 0, 3, 5, 200, 0, 0, 12]
    top_ps = [0.9, 0.95, 0.999, 0.9, 0.8, 1.0, 0.5, 1.0]
    min_ps = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0]
    guessed = keep_thresholds(logits, top_ks, top_ps, min_ps, guess=8)
    whole = keep_thresholds(logits, top_ks, top_ps, min_ps, guess=vocab)
    assert torch.equal(logits >= guessed.unsqueeze(1), logits >= whole.unsqueeze(1))
    kept = (logits >= whole.unsqueeze(1)).sum(dim=1).tolist()
    assert kept[1] > 8 and 8 < kept[4] < 200 and kept[2] == 40 and kept[5] == vocab and kept[7] == 12
    assert kept[0] < 8


def test_top_p_sampling_is_renormalised() -> None:
    logits_row = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    counts = draw_counts(logits_row, 8000, top_p=0.7)
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 8000 - 0.5 / 0.8) < 0.03


def run_seeded(state: SamplingState, steps: int, batch_logits: list[torch.Tensor], row: int) -> list[int]:
    """Decode `steps` tokens for `state` placed at `row` among unseeded neighbours."""
    sampler = Sampler()
    others = [make_state(temperature=1.0) for _ in range(len(batch_logits) - 1)]
    tokens = []
    for step in range(steps):
        logits = torch.stack([lg + step * 0.01 for lg in batch_logits])
        states = others[:row] + [state] + others[row:]
        token = sampler.sample(logits, states).token_ids[row]
        state.append(token)
        tokens.append(token)
    return tokens


def test_seeded_rows_reproduce_across_batches_and_preemption() -> None:
    target = random_logits(1, seed=3)[0] / 3  # flat enough that draws vary
    kw = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "presence_penalty": 0.5}
    alone = run_seeded(make_state(**kw), 12, [target], 0)
    crowded = [random_logits(1, seed=s)[0] for s in range(5)]
    crowded.insert(2, target)
    assert run_seeded(make_state(**kw), 12, crowded, 2) == alone
    # Preempted after 5 tokens, re-entering with them as outputs: the rest is the same.
    resumed = make_state(outputs=alone[:5], **kw)
    shifted = [target + 0.05 + i * 0.01 for i in range(7)]  # the logits of steps 5..11
    sampler = Sampler()
    rest = []
    for logits_row in shifted:
        token = sampler.sample(logits_row.unsqueeze(0), [resumed]).token_ids[0]
        resumed.append(token)
        rest.append(token)
    assert rest == alone[5:]
    assert len(set(alone)) > 3
    other_seed = run_seeded(make_state(**{**kw, "seed": 99}), 12, [target], 0)
    assert other_seed != alone


def test_masked_tokens_are_never_drawn() -> None:
    # top_k=1 must always give the top token; before the fix ~0.6 % of these draws did not
    sampler = Sampler(seed=0)
    params = SamplingParams(temperature=1.0, top_k=1)
    gen = torch.Generator().manual_seed(0)
    misses = 0
    for _ in range(8):
        logits = torch.randn(256, 128256, generator=gen)
        out = sampler.sample(logits, [SamplingState(params, [1]) for _ in range(256)])
        misses += int((torch.tensor(out.token_ids) != logits.argmax(dim=-1)).sum())
    assert misses == 0


def test_logit_bias_forces_a_token() -> None:
    logits = random_logits(4, seed=4)
    states = [make_state(temperature=t, logit_bias={7: 100.0}) for t in (0.0, 1.0, 1.0, 2.0)]
    assert Sampler(seed=0).sample(logits, states).token_ids == [7, 7, 7, 7]
    banned = make_state(temperature=0.0, logit_bias={int(logits[0].argmax()): -100.0})
    assert Sampler().sample(logits[:1], [banned]).token_ids[0] != int(logits[0].argmax())


def test_min_tokens_blocks_stop_ids() -> None:
    eos = 3
    logits = torch.zeros(1, VOCAB)
    logits[0, eos] = 10.0
    state = make_state(temperature=0.0, min_tokens=2, stop_token_ids=[eos])
    sampler = Sampler()
    tokens = []
    for _ in range(3):
        tokens.append(sampler.sample(logits, [state]).token_ids[0])
        state.append(tokens[-1])
    assert tokens[0] != eos and tokens[1] != eos and tokens[2] == eos


def reference_penalties(
    logits: torch.Tensor, prompt: list[int], outputs: list[int], rep: float, freq: float, presence: float
) -> torch.Tensor:
    out = logits.clone()
    for t in set(prompt) | set(outputs):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t, c in Counter(outputs).items():
        out[t] -= c * freq + presence
    return out


def test_penalties_follow_the_formulas() -> None:
    logits = random_logits(3, seed=5)
    prompts = [[1, 2, 3, 3], [4, 5], [6]]
    outputs = [[2, 7, 7, 9], [5, 5, 5], []]
    penalties = [(1.3, 0.5, 0.25), (1.0, -0.4, 1.0), (0.8, 0.0, 0.0)]
    states = [
        make_state(prompt=p, outputs=o[:2], repetition_penalty=r, frequency_penalty=f, presence_penalty=pr)
        for p, o, (r, f, pr) in zip(prompts, outputs, penalties, strict=True)
    ]
    process_logits(logits, states)  # materialises the counts before the rest is appended
    for state, o in zip(states, outputs, strict=True):
        for t in o[2:]:
            state.append(t)
    got = process_logits(logits, states)
    for i, (p, o, (r, f, pr)) in enumerate(zip(prompts, outputs, penalties, strict=True)):
        torch.testing.assert_close(got[i], reference_penalties(logits[i], p, o, r, f, pr))
    assert not torch.equal(got, logits)


CPU = torch.device("cpu")


def penalized_state(prompt: list[int], outputs: list[int], rep: float, freq: float, presence: float) -> SamplingState:
    return make_state(prompt=prompt, outputs=outputs, repetition_penalty=rep, frequency_penalty=freq, presence_penalty=presence)


def test_many_rows_in_one_table_follow_the_formulas() -> None:
    rng = random.Random(0)
    num_rows = 300
    settings = [(1.3, 0.5, 0.25), (1.0, -0.4, 1.0), (0.8, 0.0, 0.0), (1.0, 0.0, 0.0)]  # the last: no penalty
    penalties = [settings[i % 4] for i in range(num_rows)]
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(6))] for _ in range(num_rows)]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(4))] for _ in range(num_rows)]  # resumed rows
    states = [penalized_state(p, o, *pen) for p, o, pen in zip(prompts, outputs, penalties, strict=True)]
    table = PenaltyTable(VOCAB, CPU)
    for step in range(4):
        logits = random_logits(num_rows, seed=step)
        got = process_logits(logits, states, table)
        want = torch.stack([reference_penalties(logits[i], prompts[i], outputs[i], *penalties[i]) for i in range(num_rows)])
        torch.testing.assert_close(got, want)
        for state, out in zip(states, outputs, strict=True):
            token = rng.randrange(VOCAB)
            state.append(token)
            out.append(token)
    # One row per penalized state, a mask row only for those with a repetition penalty.
    assert table.counts.shape == (225, VOCAB) and table.prompt_mask.shape == (150, VOCAB)


class CountTorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def penalty_step_calls(num_rows: int) -> tuple[int, int]:
    """torch calls of a step with num_rows new penalized rows, then of the next step."""
    states = [penalized_state([1, 2, 3], [4, 4], 1.2, 0.5, 0.1) for _ in range(num_rows)]
    table = PenaltyTable(VOCAB, CPU)
    logits = random_logits(num_rows)
    with CountTorchCalls() as first:
        process_logits(logits, states, table)
    for state in states:
        state.append(5)
    with CountTorchCalls() as second:
        process_logits(logits, states, table)
    return first.calls, second.calls


def test_penalty_work_does_not_grow_with_the_rows() -> None:
    # The same torch calls (on a GPU, the same launches) for 2 rows as for 300: nothing per row.
    assert penalty_step_calls(2) == penalty_step_calls(300)


def test_slots_are_reused_as_states_come_and_go() -> None:
    table = PenaltyTable(VOCAB, CPU)
    logits = random_logits(10)
    for batch in range(100):  # 1 000 states, 10 alive at a time
        prompts = [[(batch + i) % VOCAB] for i in range(10)]
        states = [penalized_state(p, [i], 1.5, 0.5, 0.0) for i, p in enumerate(prompts)]
        got = process_logits(logits, states, table)
    want = torch.stack([reference_penalties(logits[i], prompts[i], [i], 1.5, 0.5, 0.0) for i in range(10)])
    torch.testing.assert_close(got, want)
    assert table.counts.shape[0] <= 16 and table.prompt_mask.shape[0] <= 16


def test_a_reused_slot_starts_from_zero() -> None:
    table = PenaltyTable(VOCAB, CPU)
    logits = random_logits(1, seed=9)
    old = penalized_state([1, 2, 3], [4, 4, 5], 1.5, 1.0, 0.5)
    process_logits(logits, [old], table)
    old.append(6)  # pending, never counted: gone with the state
    del old
    new = penalized_state([7], [8], 1.5, 1.0, 0.5)
    got = process_logits(logits, [new], table)
    assert table.counts.shape[0] == 1 and table.prompt_mask.shape[0] == 1  # the old state's rows
    torch.testing.assert_close(got[0], reference_penalties(logits[0], [7], [8], 1.5, 1.0, 0.5))
    counts = new.output_counts(VOCAB, CPU)
    assert counts[8] == 1 and int(counts.sum()) == 1


def test_growth_keeps_the_rows_already_counted() -> None:
    table = PenaltyTable(VOCAB, CPU)
    first = penalized_state([1, 2], [3, 3], 1.3, 0.5, 0.2)
    process_logits(random_logits(1), [first], table)
    first.append(9)
    later = [penalized_state([10 + i], [20 + i], 1.3, 0.5, 0.2) for i in range(5)]
    logits = random_logits(6, seed=1)
    got = process_logits(logits, [first, *later], table)
    assert table.counts.shape[0] >= 6
    want = [reference_penalties(logits[0], [1, 2], [3, 3, 9], 1.3, 0.5, 0.2)]
    want += [reference_penalties(logits[1 + i], [10 + i], [20 + i], 1.3, 0.5, 0.2) for i in range(5)]
    torch.testing.assert_close(got, torch.stack(want))


def test_a_sampler_keeps_its_rows_in_one_table() -> None:
    # Greedy rows give their top token up for the second once it occurred; 50 batches of 4
    # new states take the same 4 rows of the sampler's table.
    sampler = Sampler(seed=0)
    logits = torch.zeros(4, VOCAB)
    for i in range(4):
        logits[i, i], logits[i, 10 + i] = 1.0, 0.5
    for _ in range(50):
        states = [make_state(temperature=0.0, frequency_penalty=1.0, outputs=[i]) for i in range(4)]
        assert sampler.sample(logits, states).token_ids == [10, 11, 12, 13]
    assert sampler._penalties is not None and sampler._penalties.counts.shape[0] == 4


def test_plain_rows_are_not_copied() -> None:
    logits = random_logits(2)
    assert process_logits(logits, [make_state(), make_state(temperature=0.0)]) is logits


def test_logprobs_match_log_softmax_of_raw_logits() -> None:
    logits = random_logits(4, seed=6, vocab=100)
    states = [
        make_state(temperature=0.0, logprobs=5),
        make_state(temperature=0.8, logprobs=20, presence_penalty=1.0, outputs=[1, 2]),
        make_state(temperature=1.0),
        make_state(temperature=1.0, logprobs=0),
    ]
    out = Sampler(seed=0).sample(logits, states)
    assert out.logprobs is not None and out.logprobs[2] is None
    reference = torch.log_softmax(logits, -1)
    for i, k in ((0, 5), (1, 20), (3, 0)):
        row = out.logprobs[i]
        assert row is not None
        token = out.token_ids[i]
        assert row.token_id == token
        assert row.logprob == pytest.approx(reference[i, token].item(), abs=1e-5)
        assert row.rank == int((reference[i] > reference[i, token]).sum()) + 1
        top = reference[i].topk(k)
        assert row.top_ids == top.indices.tolist()
        assert row.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-5)
    assert out.logprobs[0] is not None and out.logprobs[0].rank == 1


def test_prompt_logprobs_in_chunks() -> None:
    logits = random_logits(7, seed=7)
    next_ids = [3, 1, 4, 1, 5, 9, 2]
    rows = compute_prompt_logprobs(logits, next_ids, num_top=3, chunk_size=3)
    reference = torch.log_softmax(logits, -1)
    assert len(rows) == 7
    for i, (row, t) in enumerate(zip(rows, next_ids, strict=True)):
        assert row.token_id == t
        assert row.logprob == pytest.approx(reference[i, t].item(), abs=1e-5)
        assert row.rank == int((reference[i] > reference[i, t]).sum()) + 1
        assert row.top_ids == reference[i].topk(3).indices.tolist()


def test_state_counts_outputs_given_at_creation_and_appended() -> None:
    state = make_state(outputs=[1, 1, 2], frequency_penalty=1.0)
    state.append(2)
    state.append(5)
    counts = state.output_counts(VOCAB, torch.device("cpu"))
    assert state.num_output_tokens == 5
    assert counts[[1, 2, 5]].tolist() == [2, 2, 1] and int(counts.sum()) == 5


def test_rows_and_states_must_agree() -> None:
    with pytest.raises(ValueError):
        Sampler().sample(random_logits(2), [make_state()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    logits = random_logits(6, seed=8, vocab=32000)

    def states() -> list[SamplingState]:
        return [
            make_state(temperature=0.0, logprobs=20),
            make_state(
                prompt=[1, 2],
                outputs=[5, 5, 9],
                temperature=0.0,
                repetition_penalty=1.2,
                frequency_penalty=0.3,
                presence_penalty=0.2,
                logit_bias={11: 3.0},
            ),
            make_state(temperature=0.0, min_tokens=1, stop_token_ids=[int(logits[2].argmax())]),
            make_state(temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, seed=7, logprobs=3),
            make_state(temperature=1.0, seed=8),
            make_state(temperature=1.3),
        ]

    cpu_states, gpu_states = states(), states()
    torch.testing.assert_close(
        process_logits(logits.cuda(), gpu_states).cpu(), process_logits(logits, cpu_states)
    )
    out = Sampler(seed=0).sample(logits.cuda(), gpu_states)
    assert out.sampled.is_cuda
    assert out.token_ids[:3] == Sampler().sample(logits, cpu_states).token_ids[:3]
    assert out.logprobs is not None and out.logprobs[0] is not None
    reference = torch.log_softmax(logits, -1)
    assert out.logprobs[0].top_ids == reference[0].topk(20).indices.tolist()
    seeds = [1, 2**62, 12345]
    torch.testing.assert_close(
        exponential_noise(seeds, 4096, torch.device("cuda")).cpu(),
        exponential_noise(seeds, 4096, torch.device("cpu")),
    )
    # Seeded rows: the same tokens alone on the GPU as inside the batch.
    alone = Sampler().sample(logits[3:5].cuda(), states()[3:5]).token_ids
    assert alone == out.token_ids[3:5]


def test_grammar_mask_limits_its_rows_after_penalties_and_leaves_logprobs_raw() -> None:
    from engine.worker.grammar_masks import StepMask

    logits = random_logits(4, seed=7)
    allowed = [3, 17, 40]
    bitmask = torch.zeros(2, (VOCAB + 31) // 32, dtype=torch.int32)
    for token in allowed:  # mask 0 for row 1 (sampled), mask 1 for row 3 (greedy)
        bitmask[:, token // 32] |= 1 << (token % 32)
    mask = StepMask(bitmask, torch.tensor([1, 3]))
    # Row 3's best allowed token is penalized (it occurred): the mask comes after the penalty.
    best_allowed = max(allowed, key=lambda t: float(logits[3, t]))
    sampler = Sampler(seed=0)
    drawn = set()
    for seed in range(40):
        states = [
            make_state(temperature=0.0, logprobs=1), make_state(temperature=1.0, seed=seed, logprobs=1),
            make_state(temperature=1.0, seed=seed), make_state([best_allowed], [best_allowed], temperature=0.0,
                                                               frequency_penalty=2.0, presence_penalty=2.0),
        ]
        out = sampler.sample(logits, states, mask)
        assert out.token_ids[0] == int(logits[0].argmax())  # unmasked rows as without a mask
        assert out.token_ids[1] in allowed
        penalized = logits[3].clone()
        penalized[best_allowed] -= 4.0
        assert out.token_ids[3] == max(allowed, key=lambda t: float(penalized[t]))
        raw = logits[1].log_softmax(-1)
        assert out.logprobs is not None and out.logprobs[1] is not None
        assert out.logprobs[1].logprob == pytest.approx(float(raw[out.token_ids[1]]), abs=1e-5)
        drawn.add(out.token_ids[1])
    assert len(drawn) >= 2  # still drawn, not forced to one
