"""lightgate's HTTP surface: an OpenAI-compatible server over the `engine` package.

`Client` (a thin layer over the openai SDK) is imported on first use, so that the server
does not pay for the SDK's import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai_compat.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from openai_compat.client import Client

        return Client
    raise AttributeError(f"module 'openai_compat' has no attribute {name!r}")
