"""Step plans cross the pipe to the worker pickled: every field comes back as it went."""

from __future__ import annotations

import dataclasses
import pickle
from multiprocessing.reduction import ForkingPickler

from engine.messages import NewRow, SeqStep, StepPlan
from engine.router.seq import Seq
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


def test_the_routers_sequence_stays_in_the_server_process() -> None:
    """A scheduled step carries its `Seq` for the engine core; the worker gets the same bytes
    as for a step without it, and the stop ids it needs for min_tokens travel in the new row."""
    params = SamplingParams(min_tokens=3, stop_token_ids=[7])
    seq = Seq("r", "r#0", 0, [5, 6], params, max_tokens=4, stop_token_ids=frozenset({2, 7}))
    new_row = NewRow(params, seq.prompt_token_ids, [], seq.stop_token_ids)
    with_seq = SeqStep(0, 0, [5, 6], [10, 11], True, None, new_row, None, seq)
    without = SeqStep(0, 0, [5, 6], [10, 11], True, None, new_row)
    data = bytes(ForkingPickler.dumps(StepPlan(1, [with_seq])))
    assert data == bytes(ForkingPickler.dumps(StepPlan(1, [without])))
    back = pickle.loads(data).seqs[0]
    assert back.seq is None and back == with_seq
    assert back.new_row.stop_token_ids == {2, 7}
