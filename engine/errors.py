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
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + num_requested_tokens} tokens ({num_prompt_tokens} in the messages, "
            f"{num_requested_tokens} in the completion). Please reduce the length of the messages "
            "or completion."
        )
