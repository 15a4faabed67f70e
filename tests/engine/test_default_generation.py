"""Generation features on the embedded default model (SmolLM2-135M-Instruct), through `LLM`."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    with LLM() as llm:
        yield llm


def _chat(llm: LLM, text: str) -> list[int]:
    ids = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_capital_of_france(llm: LLM) -> None:
    out = llm.generate([_chat(llm, "What is the capital of France?")], SamplingParams(temperature=0.0, max_tokens=32))
    choice = out[0].outputs[0]
    assert choice.text == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    # The end-of-turn token is in token_ids but not in the text.
    assert llm.get_tokenizer().decode(choice.token_ids[-1:]) == "<|im_end|>"


def test_stop_string_is_matched_and_excluded(llm: LLM) -> None:
    prompt = _chat(llm, "What is the capital of France?")
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32, stop=["France is"]))[0].outputs[0]
    assert out.text == "The capital of "
    assert out.finish_reason == "stop" and out.stop_reason == "France is"
    kept = SamplingParams(temperature=0.0, max_tokens=32, stop=["France is"], include_stop_str_in_output=True)
    assert llm.generate([prompt], kept)[0].outputs[0].text == "The capital of France is"


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    prompt = _chat(llm, "What is the capital of France?")
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32))[0].outputs[0]
    stop_id = full.token_ids[3]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[stop_id]))[0]
    assert out.outputs[0].token_ids == full.token_ids[:4]
    assert out.outputs[0].stop_reason == stop_id
    short = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
    assert short.token_ids == full.token_ids[:3] and short.finish_reason == "length"


def test_ignore_eos_and_min_tokens(llm: LLM) -> None:
    prompt = _chat(llm, "What is the capital of France?")
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 20 and out.finish_reason == "length"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, min_tokens=12))[0].outputs[0]
    assert len(out.token_ids) >= 12


def test_seed_reproducible_and_n_choices_differ(llm: LLM) -> None:
    prompt = "Once upon a time"
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=1234, n=3)
    first = llm.generate([prompt], params)[0]
    # The same seed in a different batch gives the same text.
    batch = llm.generate([prompt, "Another prompt", prompt], params)
    assert [c.text for c in batch[0].outputs] == [c.text for c in first.outputs]
    assert [c.text for c in batch[2].outputs] == [c.text for c in first.outputs]
    assert len({c.text for c in first.outputs}) == 3
    assert [c.index for c in first.outputs] == [0, 1, 2]
    other = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=24, seed=99))[0]
    assert other.outputs[0].text != first.outputs[0].text


def test_logprobs_with_twenty_alternatives(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=20)
    out = llm.generate([_chat(llm, "Say hello.")], params)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry[token_id].rank == 1  # greedy: the chosen token is the most likely
        assert len(entry) == 20
        values = sorted((lp.logprob for lp in entry.values()), reverse=True)
        assert values[0] <= 0.0 and all(lp.decoded_token is not None for lp in entry.values())


def test_logit_bias_forces_a_token(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    target = tok.encode(" banana", add_special_tokens=False)[0]
    params = SamplingParams(temperature=0.0, max_tokens=3, logit_bias={target: 100.0})
    out = llm.generate(["Hello"], params)[0].outputs[0]
    assert out.token_ids == [target] * 3


def test_bad_input_is_rejected_with_the_field_named(llm: LLM) -> None:
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[1] * (llm.max_model_len - 2)], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[]])
