"""A thin Python client over the official `openai` SDK, as the LightLLM docs show one.

    from openai_compat import Client
    print(Client(model="SmolLM2-135M-Instruct").query("What is a lighthouse?"))
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class Client:
    """Chat with a lightgate (or any OpenAI-compatible) server.

    `model=None` uses the first model the server lists; `api_key=None` falls back to
    `OPENAI_API_KEY`, then to a placeholder (a server without API keys ignores it).
    """

    def __init__(
        self, model: str | None = None, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.openai = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout)
        self._model = model

    @property
    def model(self) -> str:
        if self._model is None:
            models = self.openai.models.list().data
            if not models:
                raise RuntimeError("the server lists no models")
            self._model = models[0].id
        return self._model

    def _messages(self, text: str, system: str | None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": text}]

    def query(self, text: str, system: str | None = None, **params: Any) -> str:
        """The answer to one user message. `params`: any chat completion field (max_tokens, ...)."""
        params = {k: v for k, v in params.items() if v is not None}
        response = self.openai.chat.completions.create(
            model=self.model, messages=self._messages(text, system), **params  # type: ignore[arg-type]
        )
        return response.choices[0].message.content or ""

    def stream(self, text: str, system: str | None = None, **params: Any) -> Iterator[str]:
        """The answer to one user message, piece by piece as the server streams it."""
        params = {k: v for k, v in params.items() if v is not None}
        chunks: Any = self.openai.chat.completions.create(
            model=self.model, messages=self._messages(text, system), stream=True, **params  # type: ignore[arg-type]
        )
        for chunk in chunks:
            for choice in chunk.choices:
                if choice.delta.content:
                    yield choice.delta.content

    def close(self) -> None:
        self.openai.close()
