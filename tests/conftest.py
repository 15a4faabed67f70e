"""Fixtures shared by the tiers: the tiny model, and real servers on it in subprocesses
(helpers in `tests/openai_compat/servers.py`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.openai_compat.servers import ALIASES, TINY_ARGS, ProcessServer, build_tiny_model

os.environ.setdefault("OPENAI_API_KEY", "unused")
# Idle OpenMP threads sleep at once rather than spin: the tests run torch in this process, in
# engine workers and in servers at the same time, more threads than a small machine's cores, and
# a spinning thread holds a core that the thread a parallel region waits for could run on
# (engine/worker/cpu_threads.py). Read when torch loads, which nothing above imports; the
# processes the tests start inherit it. Only how idle threads wait changes, not what they compute.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with the default model's real tokenizer and chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """The tiny model served as `tiny` (also answering to the names in ALIASES), default settings."""
    server = ProcessServer(
        "--model", str(tiny_model_dir), *TINY_ARGS, "--model-aliases", ",".join(ALIASES),
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """The embedded default model (SmolLM2-135M-Instruct) served as `make serve` serves it, with a
    2048-token context: for tests of what a real model writes."""
    server = ProcessServer("--max-model-len", "2048", log_dir=tmp_path_factory.mktemp("logs"))
    try:
        yield server.wait_healthy()
    finally:
        assert server.stop() == 0
