"""Step plans cross the pipe to the worker pickled: every field comes back as it went."""

from __future__ import annotations

import dataclasses
import pickle
from multiprocessing.reduction import ForkingPickler

from engine.messages import NewRow, SeqStep, StepPlan
from engine.sampling_params import SamplingParams


def test_a_plan_round_trips_through_the_workers_pickler() -> None:
    new_row = NewRow(SamplingParams(temperature=0.5, seed=3, max_tokens=9), [5, 6, 7], [8])
    seqs = [
        SeqStep(0, 12, [-1], [40], True),
        SeqStep(3, 2, [7, 8, 9], [41, 42, 43], False, prefix_slots=[10, 11], new_row=new_row, prompt_logprobs=2),
    ]
    plan = StepPlan(5, seqs, [1, 2])
    for data in (bytes(ForkingPickler.dumps(plan)), pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)):
        back = pickle.loads(data)
        assert back == plan
        assert [dataclasses.astuple(s) for s in back.seqs] == [dataclasses.astuple(s) for s in seqs]
