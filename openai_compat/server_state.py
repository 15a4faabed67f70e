"""What the HTTP side knows of the engine: `ServerState`, one per app.

It knows whether the engine is loading, ready, dead or draining (`check_ready` raises the 503
a request gets meanwhile), which model names it answers to, the prompt-length bound of
`prompt_size.py` once the tokenizer is loaded, and runs tokenizer work off the event loop on a
thread of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from engine import AsyncEngine, EngineStats
from openai_compat.config import Settings
from openai_compat.daemon_executor import DaemonThreadExecutor
from openai_compat.errors import OpenAIError, model_not_found, not_ready
from openai_compat.metrics import Metrics
from openai_compat.prompt_size import PromptBound

T = TypeVar("T")


class ServerState:
    """The engine plus what the HTTP side knows about it; one per app."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.created = int(time.time())
        self.loaded = False
        self.load_error: BaseException | None = None
        self.draining = False
        self.metrics = Metrics(self._stats)
        # The fewest tokens a text can be, from its length: set once the tokenizer is loaded,
        # None when the tokenizer does not vouch for one (prompt_size.py).
        self.prompt_bound: PromptBound | None = None
        # A daemon thread: a tokenization in flight never holds up the process's exit.
        self._tokenizer_thread = DaemonThreadExecutor("lightgate-tokenizer")

    def _stats(self) -> EngineStats | None:
        if not self.loaded:
            return None
        try:
            return self.engine.stats()
        except Exception:  # a dead engine must not take /metrics down with it
            return None

    @property
    def served_model_name(self) -> str:
        return self.settings.served_model_name or self.engine.model_name

    @property
    def model_names(self) -> list[str]:
        return [self.served_model_name, *self.settings.model_aliases]

    def mark_loaded(self) -> None:
        tokenizer = self.engine.tokenizer
        if tokenizer is not None and self.settings.chat_template is not None:
            tokenizer.chat_template = self.settings.chat_template  # --chat-template replaces the model's
        self.loaded = True
        self.metrics.model_name = self.served_model_name

    @property
    def healthy(self) -> bool:
        return self.loaded and not self.engine.errored

    def check_ready(self) -> None:
        if self.load_error is not None:
            raise not_ready(f"The model failed to load: {self.load_error}")
        if not self.loaded:
            raise not_ready("The model is still loading. Please retry shortly.")
        if self.engine.errored:
            raise not_ready(f"The inference engine is not available: {self.engine.dead_error}")
        if self.draining:
            raise not_ready("The server is shutting down.")

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise model_not_found(model)

    async def run_tokenizer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Tokenizer work (CPU) off the event loop, one call at a time: a Hugging Face fast
        tokenizer is not safe to use from several threads at once."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def tokenizer(self) -> Any:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise OpenAIError("This model ships no tokenizer: send token ids as the prompt.", param="prompt")
        return tokenizer

    def chat_tokenizer(self, template_in_request: bool = False) -> Any:
        """The tokenizer, for a request with `messages`: a 400 when the model has no chat template
        (a base model), none was given with --chat-template and the request brings none."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise OpenAIError("This model ships no tokenizer, so it cannot serve chat: use /v1/completions "
                              "with token ids.", param="messages")
        if not template_in_request and not getattr(tokenizer, "chat_template", None):
            raise OpenAIError("This model has no chat template: use /v1/completions, or start the server with "
                              "--chat-template FILE.", param="messages")
        return tokenizer
