"""Tool-call formats on the chat templates of the families the engine serves (test data in
`tests/openai_compat/data/chat_templates/`, written from the templates those models publish
in their tokenizer_config.json): the format is found from the template, the template renders
the tools and the history, and the format reads back the calls the template writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from openai_compat.chat_format import ChatFormat, special_token_texts
from openai_compat.protocol import ChatCompletionRequest
from openai_compat.reasoning import select_reasoning
from openai_compat.serving_chat import render_chat, template_messages
from openai_compat.tool_calls import rendering
from openai_compat.tool_calls.formats import (
    FORMATS,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    mistral_call_id,
    select_format,
    template_has_tools,
)
from openai_compat.tool_calls.request import plan_tools
from tests.openai_compat.tool_calls.helpers import read_every_way

TEMPLATES = Path(__file__).parents[1] / "data" / "chat_templates"
CALL_ID = "call_9f8e7d6c5b4a39281706f5e4"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The weather now in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": '{"celsius": 21}'},
]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def chat_format(source: str, tokenizer: Any) -> ChatFormat:
    return ChatFormat(select_format("auto", source), select_reasoning("auto", source), template_has_tools(source),
                      special_token_texts(tokenizer))


def render(source: str, tokenizer: Any, body: dict[str, Any]) -> tuple[ChatFormat, str]:
    req = ChatCompletionRequest.model_validate({"model": "m", **body})
    fmt = chat_format(source, tokenizer)
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    messages, tools = fmt.conversation(template_messages(req.messages), plan, None)
    text, _ = render_chat(tokenizer, messages, True, {"chat_template": source}, tools=tools)
    return fmt, text


@pytest.mark.parametrize(("name", "tool_format", "has_tools", "thinks"), [
    ("qwen2_5", "hermes", True, False),
    ("qwen3", "hermes", True, True),
    ("llama3_1", "llama3_json", True, False),
    ("mistral_v0_3", "mistral", True, False),
    ("phi3", "hermes", False, False),
    ("deepseek_r1_distill", "hermes", False, True),
])
def test_format_found_from_the_template(name: str, tool_format: str, has_tools: bool, thinks: bool) -> None:
    source = template(name)
    assert select_format("auto", source).name == tool_format
    assert template_has_tools(source) is has_tools
    assert (select_reasoning("auto", source) is not None) is thinks
    assert select_format("mistral", source) is MISTRAL and select_reasoning("none", source) is None


def test_the_default_models_template_has_no_place_for_tools(tiny_tokenizer: Any) -> None:
    fmt = ChatFormat.of(tiny_tokenizer)
    assert fmt.tool_format is HERMES and not fmt.template_has_tools and fmt.reasoning is None


# (template, the text just before the assistant's call turn, the text that ends it)
CALL_TURNS = [
    ("qwen2_5", "<|im_start|>assistant\n", "<|im_end|>"),
    ("qwen3", "<|im_start|>assistant\n", "<|im_end|>"),
    ("llama3_1", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ("mistral_v0_3", "[/INST]", "<|im_end|>"),
    ("phi3", "<|assistant|>\n", "<|end|>"),
]


@pytest.mark.parametrize(("name", "before", "after"), CALL_TURNS, ids=[c[0] for c in CALL_TURNS])
def test_template_renders_tools_and_history_and_the_format_reads_its_calls(
    tiny_tokenizer: Any, name: str, before: str, after: str
) -> None:
    fmt, text = render(template(name), tiny_tokenizer, {"messages": CONVERSATION, "tools": [WEATHER]})
    assert "The weather now in a city" in text  # the tools' definitions
    assert "celsius" in text  # the tool result (Llama's template writes it as a JSON string)
    turn = text.split(before, 1)[1].split(after, 1)[0]
    content, calls = read_every_way(fmt.tool_format, turn)
    assert calls == [("get_weather", {"city": "Paris"})] and content == ""


def test_mistral_history_ids_are_nine_characters(tiny_tokenizer: Any) -> None:
    _, text = render(template("mistral_v0_3"), tiny_tokenizer, {"messages": CONVERSATION, "tools": [WEATHER]})
    short = mistral_call_id(CALL_ID)
    assert short == "6c5b4a39281706f5e4"[-9:] and len(short) == 9
    assert f'"id": "{short}"' in text and f'"call_id": "{short}"' in text


def test_no_place_for_tools_puts_them_in_the_system_message(tiny_tokenizer: Any, caplog: Any) -> None:
    rendering._warned_no_tool_slot = False
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            fmt, text = render(template("phi3"), tiny_tokenizer, {"messages": CONVERSATION, "tools": [WEATHER]})
    assert sum("no place for tools" in r.message for r in caplog.records) == 1  # logged once
    system = text.split("<|system|>\n", 1)[1].split("<|end|>", 1)[0]
    assert system.startswith("Answer briefly.\n\n# Tools\n")  # the request's own system text first
    assert json.dumps(WEATHER) in system and HERMES.instructions() in system
    # The history reaches the model in the same format; tool results as a user turn.
    assert "<|user|>\n<tool_response>\n" + '{"celsius": 21}' + "\n</tool_response><|end|>" in text


@pytest.mark.parametrize(("choice", "told"), [
    ("required", "In this reply, call one of these functions."),
    ({"type": "function", "function": {"name": "get_weather"}}, "In this reply, call the function get_weather."),
    ("none", "Do not call any function in this reply."),
])
def test_a_forced_choice_is_told(tiny_tokenizer: Any, choice: Any, told: str) -> None:
    messages = [{"role": "user", "content": "Weather?"}]
    _, text = render(tiny_tokenizer.chat_template, tiny_tokenizer,
                     {"messages": messages, "tools": [WEATHER], "tool_choice": choice})
    assert text.startswith("<|im_start|>system\n# Tools\n") and told in text


def test_consecutive_tool_results_share_one_turn(tiny_tokenizer: Any) -> None:
    messages = [*CONVERSATION, {"role": "tool", "tool_call_id": CALL_ID, "content": "second"}]
    _, text = render(template("phi3"), tiny_tokenizer, {"messages": messages, "tools": [WEATHER]})
    assert '{"celsius": 21}\n</tool_response>\n<tool_response>\nsecond\n</tool_response><|end|>' in text


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_forced_shape_is_what_the_format_reads(name: str) -> None:
    """A text of the TaggedJSON shape a forced call is constrained to reads back as the calls."""
    fmt = FORMATS[name]
    key = fmt.arguments_key
    items = [{"name": "get_weather", key: {"city": "Paris"}}, {"name": "get_time", key: {}}]
    shape = fmt.tagged_json({"type": "object"}, 1, None)
    if fmt is MISTRAL:
        text = shape.begin + json.dumps(items) + shape.end
        assert json.loads(shape.schema)["type"] == "array"
    else:
        text = shape.separator.join(shape.begin + json.dumps(item) + shape.end for item in items)
    assert read_every_way(fmt, text) == ("", [("get_weather", {"city": "Paris"}), ("get_time", {})])
    assert fmt.keeps_special_tokens and (fmt is LLAMA3_JSON) == (shape.separator == "; ")
