"""One parse of a GGUF file's metadata per conversion.

`gguf.GGUFReader` parses every metadata field in Python when it opens a file (each token of a
vocabulary its own numpy view), which takes seconds for a vocabulary of 50k tokens or more, and
a conversion opens the file four times: for its architecture, in transformers' config and
tokenizer loaders, and for its tensors. Within `shared_readers()` every `gguf.GGUFReader(path)`
returns one reader per file, transformers' too (it imports the class from `gguf` when it loads a
file). Readers only read, so sharing one changes nothing but the time; outside the block the
class is gguf's own again.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import gguf

_lock = threading.Lock()  # one conversion at a time swaps the class


@contextlib.contextmanager
def shared_readers() -> Iterator[None]:
    """Within the block, `gguf.GGUFReader(path, mode)` opens each file once."""
    with _lock:
        original = gguf.GGUFReader
        readers: dict[tuple[str, str], Any] = {}

        def opened(path: str | os.PathLike[str], mode: str = "r") -> Any:
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = original(path, mode)  # type: ignore[arg-type]
            return readers[key]

        gguf.GGUFReader = opened  # type: ignore[assignment,misc]
        try:
            yield
        finally:
            gguf.GGUFReader = original  # type: ignore[misc]
