"""Constrained decoding end to end through `LLM`: a random-weight model with the default model's
tokenizer (tests/conftest.py `tiny_model_dir`), whose tokens are noise, writes only what its
constraint accepts. Every schema and grammar here is bounded (`maxLength`, `maxItems`, ranges),
so every answer is complete well within max_tokens: an answer that does not parse or validate
is the grammar's failure, never chance.

Seeded sampling depends on neither the batch nor preemption, so the same seeded constrained
requests give the same tokens under KV pressure (preemption replays each matcher from the
sequence's outputs) with the worker launching ahead, and with tensor parallelism. The GPU tier
runs them under CUDA graphs and launch-ahead, where a launch that waited for the device raises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams, StructuredOutput, TaggedJSON
from engine.outputs import OutputAccumulator, RequestOutput

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "level": {"type": "integer", "minimum": -5, "maximum": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
JSON = StructuredOutput(json_schema=json.dumps(SCHEMA))
PROMPTS = ["Describe a user.", "Who lives in Paris?", "JSON please:", "A record"]
MAX_TOKENS = 160  # above what SCHEMA's longest answer takes (its strings' characters one token each)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path):
    with LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_gb=0.02) as llm:
        yield llm


def texts(out: RequestOutput) -> list[str]:
    return [c.text for c in out.outputs]


def check_json(outs: list[RequestOutput]) -> None:
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.text), SCHEMA)


def seeded_json(seed: int, n: int = 2) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=MAX_TOKENS, structured_output=JSON)


def test_json_schema_answers_parse_and_validate(llm: LLM) -> None:
    outs = llm.generate(PROMPTS, [seeded_json(10 * i) for i in range(len(PROMPTS))])  # (choice j: seed + j)
    check_json(outs)
    answers = [t for out in outs for t in texts(out)]
    assert len(set(answers)) == len(answers)  # every choice sampled its own answer


def test_json_object(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_output=StructuredOutput(json_object=True))
    out = llm.generate(["{"], params)[0].outputs[0]
    if out.finish_reason == "stop":  # any object: unbounded, it may be cut short
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.startswith("{")


def test_regex_choice_and_lark_grammar(llm: LLM) -> None:
    regex = StructuredOutput(regex=r"[a-z]{3}-[0-9]{2,4}")
    choice = StructuredOutput(choice=("red", "green", "light blue"))
    grammar = StructuredOutput(grammar='start: num (op num){0,3}\nop: "+" | "*"\nnum: /[0-9]{1,3}/\n')
    cases = [(regex, re.compile(r"[a-z]{3}-[0-9]{2,4}")), (choice, re.compile("red|green|light blue")),
             (grammar, re.compile(r"[0-9]{1,3}([+*][0-9]{1,3}){0,3}"))]
    params = [SamplingParams(temperature=1.0, seed=s, n=3, max_tokens=40, structured_output=so)
              for so, _ in cases for s in range(2)]
    outs = llm.generate(["x"] * len(params), params)
    for out, (_, pattern) in zip(outs, [case for case in cases for _ in range(2)], strict=True):
        for c in out.outputs:
            assert c.finish_reason == "stop" and pattern.fullmatch(c.text), c


def test_tagged_json_for_tool_calls(llm: LLM) -> None:
    item = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
        "additionalProperties": False}}, "required": ["name", "arguments"], "additionalProperties": False}
    calls = TaggedJSON("<tool_call>\n", json.dumps(item), "\n</tool_call>", min_items=1, max_items=2, separator="\n")
    params = SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=MAX_TOKENS,
                            structured_output=StructuredOutput(tagged_json=calls))
    for c in llm.generate(["Weather?"], params)[0].outputs:
        assert c.finish_reason == "stop"
        found = re.fullmatch(r"<tool_call>\n(.*?)\n</tool_call>(?:\n<tool_call>\n(.*?)\n</tool_call>)?", c.text, re.S)
        assert found is not None, c.text
        for text in filter(None, found.groups()):
            jsonschema.validate(json.loads(text), item)


def test_stop_strings_and_logprobs_with_a_constraint(llm: LLM) -> None:
    forced = StructuredOutput(choice=("hello world; goodbye",))
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=40, stop=[";"], logprobs=3, structured_output=forced)
    out = llm.generate(["x"], params)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("hello world", "stop", ";")
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        # The raw distribution's logprob (a noise model: far from certain), not the mask's (0).
        assert entry[token_id].logprob < -1.0 and len(entry) >= 3


def test_min_tokens_yields_to_a_complete_grammar(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=20, min_tokens=8,
                            structured_output=StructuredOutput(choice=("yes",)))
    out = llm.generate(["x"], params)[0].outputs[0]
    # Only end tokens may follow "yes": they are sampled (and kept out of the text) up to min_tokens.
    assert (out.text, out.finish_reason) == ("yes", "stop") and len(out.token_ids) == 8


def test_unconstrained_rows_unchanged_beside_constrained_ones(llm: LLM) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain)]
    mixed = llm.generate(PROMPTS * 2, [plain] * len(PROMPTS) + [seeded_json(s, 1) for s in range(len(PROMPTS))])
    assert [o.outputs[0].token_ids for o in mixed[: len(PROMPTS)]] == alone
    check_json(mixed[len(PROMPTS):])


def _run_all(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> tuple[list[RequestOutput], int]:
    """The offline loop, counting the results that came after the next step's launch."""
    core = llm.core
    accs = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(f"r{i}", prompt, p)
        accs[f"r{i}"] = OutputAccumulator(p.n)
    ahead = 0
    while core.has_work:
        core.plan_ahead(send=True)
        if not core.num_in_flight:
            break
        result = core.recv_result()
        ahead += result.launched_ahead
        for out in core.process_result(result).outputs:
            accs[out.request_id].add(out)
    return [accs[f"r{i}"].result() for i in range(len(prompts))], ahead


def test_preemption_and_launch_ahead_give_the_same_answers(llm: LLM, tiny_model_dir: Path) -> None:
    prompts = PROMPTS * 2
    params = [seeded_json(100 + 10 * i) for i in range(len(prompts))]
    expected = [texts(o) for o in llm.generate(prompts, params)]
    # A pool of ~220 tokens for 16 answers of 40-90 tokens after their prompts: sequences are
    # preempted and come back with their outputs, which their new matchers replay.
    tight = dict(dtype="float32", kv_cache_memory_gb=220 * 512 / 2**30, max_num_seqs=6, max_num_batched_tokens=32,
                 admission="aggressive", launch_ahead=True)
    with LLM(str(tiny_model_dir), **tight) as small:  # type: ignore[arg-type]
        outs, ahead = _run_all(small, prompts, params)
        assert small.core.scheduler.num_preemptions > 0 and ahead > 0  # both are real
    check_json(outs)
    assert [texts(o) for o in outs] == expected


def test_tensor_parallel_2_gives_the_same_answers(llm: LLM, tiny_model_dir: Path) -> None:
    params = [seeded_json(200 + 10 * i) for i in range(2)]
    expected = [texts(o) for o in llm.generate(PROMPTS[:2], params)]
    with LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_gb=0.02, tensor_parallel_size=2) as tp2:
        outs = tp2.generate(PROMPTS[:2], params)
    check_json(outs)
    assert [texts(o) for o in outs] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_with_graphs_launch_ahead_and_no_launch_waits(tiny_model_dir: Path) -> None:
    """CUDA graphs, launch-ahead (a GPU's default), the Triton mask kernel and the mask's side
    stream, 128 constrained rows beside unconstrained ones; a launch that waited for the GPU
    would raise (`check_launch_syncs`)."""
    prompts = PROMPTS * 16
    params = [seeded_json(1000 + 10 * i) for i in range(len(prompts))]
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(tiny_model_dir), device="cuda", dtype="float32", kv_cache_memory_gb=0.5,
             check_launch_syncs=True) as gpu:
        assert gpu.core.config.resolved_launch_ahead() and gpu.core.worker_info.graph_batch_sizes
        outs = gpu.generate(PROMPTS + prompts, [plain] * len(PROMPTS) + params)
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs[: len(PROMPTS)])
    check_json(outs[len(PROMPTS):])
