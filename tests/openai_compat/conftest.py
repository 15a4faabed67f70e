"""Fixtures: the app on a scripted engine in a thread, and real servers in subprocesses."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from openai_compat.app import build_app  # noqa: E402
from openai_compat.config import Settings  # noqa: E402
from tests.openai_compat.fake_engine import FakeEngine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadServer:
    """uvicorn serving `build_app(settings, engine)` on a free port, in a background thread."""

    def __init__(self, engine: Any, **settings: Any) -> None:
        import uvicorn

        self.engine = engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(_env_file=None, port=self.port, **settings)  # type: ignore[call-arg]
        self.app = build_app(self.settings, engine)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.server

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def wait_loaded(self) -> None:
        deadline = time.monotonic() + 10
        while not self.state.loaded:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake engine did not load")
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def fake_server(engine: FakeEngine | None = None, **settings: Any) -> Iterator[ThreadServer]:
    with ThreadServer(engine or FakeEngine(), **settings) as server:
        server.wait_loaded()
        yield server


@pytest.fixture
def fake() -> Iterator[ThreadServer]:
    with fake_server() as server:
        yield server


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def metric_value(text: str, name: str) -> float:
    """The value of the first sample called `name` in a Prometheus text page."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def get_metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


os.environ.setdefault("OPENAI_API_KEY", "unused")


class ProcessServer:
    """`python -m openai_compat --port N ...` in a subprocess, as users start it."""

    def __init__(self, *args: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        import subprocess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openai_compat", "--port", str(self.port), "--log-level", "warning",
             "--no-access-log", *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 180.0) -> ProcessServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not healthy within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with the default model's real tokenizer and chat template."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.models.loader import resolve_model

    source = Path(resolve_model(None))  # the packaged default model, converted once and cached
    out = tmp_path_factory.mktemp("tiny-llama")
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")) or path.name == "chat_template.jinja":
            shutil.copy(path, out / path.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


TINY = "tiny"


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    server = ProcessServer(
        "--model", str(tiny_model_dir), "--served-model-name", TINY, "--max-model-len", "512",
        "--kv-cache-memory-gb", "0.05", log_dir=tmp_path_factory.mktemp("logs"),
    )
    try:
        yield server.wait_healthy()
    finally:
        server.stop()
