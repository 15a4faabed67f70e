"""Thinking split from the answer, whole or in any split, from where the prompt left off."""

from __future__ import annotations

from pathlib import Path

import pytest

from openai_compat.reasoning import THINK, ReasoningStream, Start, select_reasoning

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


def split(text: str, start: Start, pieces: list[str] | None = None) -> tuple[str, str]:
    stream = ReasoningStream(THINK, start)
    outs = [stream.feed(p) for p in (pieces if pieces is not None else [text])]
    outs.append(stream.finish())
    return "".join(o.reasoning for o in outs), "".join(o.content for o in outs)


def split_every_way(text: str, start: Start) -> tuple[str, str]:
    whole = split(text, start)
    for i in range(1, len(text)):
        assert split(text, start, [text[:i], text[i:]]) == whole, i
    assert split(text, start, list(text)) == whole
    return whole


def test_qwen3_thinks_then_answers() -> None:
    text = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello! How can I help?"
    assert split_every_way(text, Start.MAYBE) == ("The user greets me.\nI greet back.", "Hello! How can I help?")


def test_a_prompt_that_opened_the_thinking() -> None:
    assert split_every_way("Hmm, 2+2.\n</think>\n\n4", Start.THINKING) == ("Hmm, 2+2.", "4")


def test_no_thinking() -> None:
    assert split_every_way("  <thin and more", Start.MAYBE) == ("", "  <thin and more")
    assert split_every_way("Plain <think> text", Start.MAYBE) == ("", "Plain <think> text")
    assert split_every_way("<think>x</think>y", Start.ANSWER) == ("", "<think>x</think>y")


def test_cut_short_while_thinking() -> None:
    assert split_every_way("<think>\nStill thinking </thi", Start.MAYBE) == ("Still thinking </thi", "")


def test_the_prompt_says_where_the_answer_starts() -> None:
    assert THINK.start_state("<|im_start|>assistant\n") is Start.MAYBE
    assert THINK.start_state("<｜Assistant｜><think>\n") is Start.THINKING
    assert THINK.start_state("<|im_start|>assistant\n<think>\n\n</think>\n\n") is Start.ANSWER  # enable_thinking false


@pytest.mark.parametrize(("setting", "template", "found"), [
    ("auto", "qwen3", True), ("auto", "deepseek_r1_distill", True), ("auto", "qwen2_5", False),
    ("none", "qwen3", False), ("think", "qwen2_5", True),
])
def test_select_reasoning(setting: str, template: str, found: bool) -> None:
    source = (TEMPLATES / f"{template}.jinja").read_text()
    assert (select_reasoning(setting, source) is not None) is found
