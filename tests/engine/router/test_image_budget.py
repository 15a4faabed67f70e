"""The router's image budget (engine/router/image_budget.py): a step embeds at most
`max_image_tokens_per_step` image tokens; the images past it wait for a later step, the text
before them still runs, and an image larger than the bound runs alone; the answers stay those of
each request alone."""

from __future__ import annotations

import numpy as np
import pytest

from engine.multimodal import PromptImage
from engine.router.scheduler import Scheduler, SchedulerOutput
from engine.router.seq import Seq
from engine.sampling_params import SamplingParams
from tests.engine.factories import FakeWorker, create_scheduler, step
from tests.engine.router.test_scheduler import assert_all_released, check_invariants, expected_output

_PIXELS = np.zeros(1, dtype=np.float32)


def image_seq(r: int, pieces: list[int | tuple[int]], max_tokens: int = 4) -> Seq:
    """Request `r`: text runs (ints) and images ((tokens,)) in order; image placeholders are
    token 0 in the prompt and a negative key per image for the prefix cache."""
    prompt: list[int] = []
    keys: list[int] = []
    images = []
    for k, piece in enumerate(pieces):
        if isinstance(piece, tuple):
            images.append(PromptImage(len(prompt), piece[0], _PIXELS))
            prompt += [0] * piece[0]
            keys += [-2 - 100 * r - k] * piece[0]
        else:
            text = [(r * 131 + (len(prompt) + i) * 7) % 1000 + 1 for i in range(piece)]
            prompt += text
            keys += text
    return Seq(request_id=f"req{r}", seq_id=f"req{r}#0", index=0, prompt_token_ids=prompt,
               params=SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens, arrival_time=float(r),
               images=tuple(images), prompt_cache_keys=keys)


def embedded_per_step(sched: Scheduler, seqs: list[Seq], worker: FakeWorker) -> list[list[int]]:
    """Run to the end -> per step, the tokens of each image embedded (first reached in its row)."""
    reached: set[tuple[str, int, int]] = set()  # (seq, row incarnation, image)
    admitted: dict[str, int] = {}
    steps = []
    while sched.has_unfinished:
        out: SchedulerOutput = step(sched, worker)
        if sched.prefix_cache is None:  # (cached prefixes hold references of their own)
            check_invariants(sched)
        embedded = []
        for s in out.scheduled:
            assert s.seq is not None
            if s.new_row is not None:
                admitted[s.seq.seq_id] = admitted.get(s.seq.seq_id, 0) + 1
            lo, hi = s.start_pos, s.start_pos + len(s.token_ids)
            for k, image in enumerate(s.seq.images):
                key = (s.seq.seq_id, admitted[s.seq.seq_id], k)
                if image.offset < hi and lo < image.offset + image.num_tokens and key not in reached:
                    reached.add(key)
                    embedded.append(image.num_tokens)
        steps.append(embedded)
    for seq in seqs:
        assert seq.output_token_ids == expected_output(seq)
    sched.reset_prefix_cache()
    assert_all_released(sched)
    return steps


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_a_step_embeds_at_most_the_bound_and_the_rest_waits(prefix_cache: bool) -> None:
    # Four requests of two 10-token images each arrive at once: 80 image tokens, 25 a step.
    sched = create_scheduler(max_num_batched_tokens=256, max_image_tokens_per_step=25,
                             enable_prefix_caching=prefix_cache)
    seqs = [image_seq(r, [3, (10,), 2, (10,), 4]) for r in range(4)]
    for seq in seqs:
        sched.add(seq)
    steps = embedded_per_step(sched, seqs, FakeWorker(4096))
    assert all(sum(images) <= 25 for images in steps)
    assert sum(len(images) for images in steps) == 8  # each image once
    assert [sum(images) for images in steps[:4]] == [20, 20, 20, 20]


def test_without_a_bound_one_step_embeds_every_image() -> None:
    sched = create_scheduler(max_num_batched_tokens=256)
    seqs = [image_seq(r, [3, (10,), 2, (10,), 4]) for r in range(4)]
    for seq in seqs:
        sched.add(seq)
    assert embedded_per_step(sched, seqs, FakeWorker(4096))[0] == [10] * 8


def test_the_text_before_a_held_back_image_still_runs() -> None:
    sched = create_scheduler(max_num_batched_tokens=256, max_image_tokens_per_step=12)
    a, b = image_seq(0, [2, (10,), 1]), image_seq(1, [5, (10,), 1])
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.seq_id, len(s.token_ids)) for s in out.scheduled if s.seq] == [("req0#0", 13), ("req1#0", 5)]


def test_an_image_larger_than_the_bound_runs_alone_and_is_not_starved() -> None:
    sched = create_scheduler(max_num_batched_tokens=64, max_image_tokens_per_step=8)
    seqs = [image_seq(0, [2, (6,), 1]), image_seq(1, [1, (30,), 2]), image_seq(2, [2, (5,), 3])]
    for seq in seqs:
        sched.add(seq)
    steps = embedded_per_step(sched, seqs, FakeWorker(4096))
    assert [images for images in steps if images] == [[6], [30], [5]]
