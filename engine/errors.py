"""Errors the engine raises through its public API."""


class EngineDeadError(RuntimeError):
    """A worker process died or stopped answering; no request can be served any more."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller may retry later."""


class PromptTooLongError(ValueError):
    """The prompt plus the requested output does not fit the model's context."""

    def __init__(self, max_model_len: int, num_prompt_tokens: int, num_requested_tokens: int) -> None:
        self.max_model_len = max_model_len
        self.num_prompt_tokens = num_prompt_tokens
        self.num_requested_tokens = num_requested_tokens
        super().__init__(self.describe("messages"))

    def describe(self, prompt_name: str) -> str:
        """The message, calling the prompt `prompt_name` ("messages" for chat, "prompt")."""
        return (
            f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
            f"{self.num_prompt_tokens + self.num_requested_tokens} tokens ({self.num_prompt_tokens} in the "
            f"{prompt_name}, {self.num_requested_tokens} in the completion). Please reduce the length of the "
            f"{prompt_name} or completion."
        )
