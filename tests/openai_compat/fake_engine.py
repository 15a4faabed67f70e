"""A scripted stand-in for `engine.AsyncEngine`: same public API, no model, no worker.

It "generates" a fixed reply one character (= one token) per step, with a configurable
step delay, so that HTTP-side behaviour (framing, aborts, errors, metrics) can be tested
in milliseconds and deterministically.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine import (
    CompletionOutput,
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    Logprob,
    PromptTooLongError,
    RequestOutput,
    SamplingParams,
)


class CharTokenizer:
    """One token per character: id = code point."""

    def __len__(self) -> int:
        return 0x10000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True, **kw: Any
    ) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    def __init__(self, reply: str = "Hello world, this is lightgate.", step_delay: float = 0.0,
                 max_model_len: int = 256, load_delay: float = 0.0) -> None:
        self.reply = reply
        self.step_delay = step_delay
        self.load_delay = load_delay
        self.max_model_len = max_model_len
        self.model_name = "fake-model"
        self.tokenizer: Any = CharTokenizer()
        self.dead_error: EngineDeadError | None = None
        self.overloaded = False
        self.die_after_steps: int | None = None
        self.first_token_delay = 0.0  # a long "prefill"
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.started = False

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    async def start(self, progress: Callable[[float, str], None] | None = None) -> None:
        if progress is not None:
            progress(0.5, "loading")
        await asyncio.sleep(self.load_delay)
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, len(self.running) / 100, 1000, 10, 4)

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if self.dead_error is not None:
            raise self.dead_error
        if self.overloaded:
            raise EngineOverloadedError("full")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token", "prompt")
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_ids))
        if len(prompt_ids) + (params.max_tokens or 1) > self.max_model_len:
            raise PromptTooLongError(self.max_model_len, len(prompt_ids), params.max_tokens or 1)
        self.running.add(request_id)
        texts = [""] * params.n
        done = [False] * params.n
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [{t: Logprob(-2.0, 1, chr(t))} for t in prompt_ids[1:]]
        finished = False
        try:
            await asyncio.sleep(self.first_token_delay)
            step = 0
            while not all(done):
                await asyncio.sleep(self.step_delay)
                if self.die_after_steps is not None and step >= self.die_after_steps:
                    raise EngineDeadError("the worker died")
                outputs = []
                for i in range(params.n):
                    if done[i]:
                        continue
                    char = self.reply[step] if step < len(self.reply) else ""
                    token = ord(char) if char else 0
                    reason = None
                    text = char
                    if not char:
                        reason = "stop"  # eos
                    else:
                        texts[i] += char
                        for stop in params.stop or []:
                            if texts[i].endswith(stop):
                                text, reason = "", "stop"
                        if reason is None and step + 1 >= max_tokens:
                            reason = "length"
                    logprobs = None
                    if params.logprobs is not None:
                        logprobs = [{token: Logprob(-0.25, 1, char), 0x78: Logprob(-2.5, 2, "x")}]
                    done[i] = reason is not None
                    outputs.append(CompletionOutput(i, text, [token], logprobs, reason))
                step += 1
                finished = all(done)
                yield RequestOutput(request_id, None, prompt_ids, outputs, finished, prompt_logprobs,
                                    num_cached_tokens=min(3, len(prompt_ids)))
        finally:
            self.running.discard(request_id)
            (self.finished if finished else self.aborted).append(request_id)
