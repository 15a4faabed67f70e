"""SamplingParams.structured_output: checked, and carried to a worker in a NewRow (pickled)."""

from __future__ import annotations

import json
import pickle

import pytest

from engine.messages import NewRow
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput, TaggedJSON


def test_structured_output_survives_the_process_boundary() -> None:
    so = StructuredOutput(
        tagged_json=TaggedJSON("<tool_call>\n", json.dumps({"type": "object"}), "\n</tool_call>", max_items=3),
        start_after="</think>",
    )
    row = NewRow(SamplingParams(structured_output=so, n=2), [1, 2], [])
    back = pickle.loads(pickle.dumps(row))
    assert back.params.structured_output == so
    assert {so: 1}[back.params.structured_output] == 1  # the grammar cache's key: equal content, one entry


def test_structured_output_must_be_one() -> None:
    with pytest.raises(ValueError, match="StructuredOutput") as info:
        SamplingParams(structured_output={"json_schema": "{}"})  # type: ignore[arg-type]
    assert info.value.args[1] == "structured_output"
    assert SamplingParams().structured_output is None
