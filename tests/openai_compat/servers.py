"""Real servers for the HTTP tests: a tiny random-weight Llama, and `python -m openai_compat`
started in a subprocess exactly as users start it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]

TINY = "tiny"  # the name the tiny model is served under
ALIASES = ("alias-a", "alias-b")  # more names the shared tiny server answers to
TINY_ARGS = ("--served-model-name", TINY, "--max-model-len", "512", "--kv-cache-memory-gb", "0.05")


def build_tiny_model(out: Path) -> Path:
    """A random 2-layer Llama in `out`, with the default model's real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.models.loader import resolve_model

    # the packaged default model, converted once and cached; LIGHTGATE_TEST_TOKENIZER names a
    # directory with the same tokenizer files where the package is not installed (the GPU host)
    source = Path(os.environ.get("LIGHTGATE_TEST_TOKENIZER") or resolve_model(None))
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")) or path.name == "chat_template.jinja":
            shutil.copy(path, out / path.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def build_tiny_llava(out: Path, next_: bool = False) -> Path:
    """A random LLaVA 1.5 in `out`: a tiny CLIP vision tower (30 px images, 6 px patches: 25 tokens
    an image) and a 2-layer Llama, with the default model's tokenizer and chat template plus an
    `<image>` token; with `next_`, LLaVA-NeXT's: the same, reading images as tiles of 30 px (25
    tokens for the whole image, then a grid of up to 3 tiles a side, unpadded, a newline a row)."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    build_tiny_model(out)  # the tokenizer files (and a text model's weights, replaced below)
    for path in out.glob("*.safetensors*"):
        path.unlink()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.save_pretrained(out)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=30, patch_size=6,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    if next_:
        pinpoints = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]
        LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=image_token_id, image_grid_pinpoints=pinpoints,
            architectures=["LlavaNextForConditionalGeneration"],
        )).save_pretrained(out)
        return out
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        architectures=["LlavaForConditionalGeneration"],
    )
    LlavaForConditionalGeneration(config).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the first sample called `name` (carrying `labels`) in a Prometheus text page."""
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def get_metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def sse_events(body: bytes) -> list[str]:
    """The data of each event of a complete stream; asserts OpenAI's exact framing on the way."""
    text = body.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [event[len("data: "):] for event in events]


# Raw-HTTP request bodies and helpers shared by the test_server_*.py files.
PROMPT = [{"role": "user", "content": "Tell me about lighthouses."}]
CHAT: dict[str, Any] = {"model": TINY, "messages": PROMPT}
GREEDY: dict[str, Any] = {"temperature": 0.0}
NO_EOS: dict[str, Any] = {"ignore_eos": True}


def post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


def stream_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def prompt_ids(url: str, **body: Any) -> list[int]:
    return list(post(url, "/tokenize", body).json()["tokens"])


def counter(text: str, name: str, **labels: str) -> float:
    """A counter's value, 0 while it has no sample yet."""
    try:
        return metric_value(text, name, **labels)
    except KeyError:
        return 0.0


def aborts(text: str) -> float:
    return counter(text, "lightgate:request_success_total", finished_reason="abort")


def idle(url: str) -> bool:
    text = get_metrics(url)
    return all(
        metric_value(text, f"lightgate:{name}") == 0
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    )


class ProcessServer:
    """`python -m openai_compat --port N ...` in a subprocess, as users start it."""

    def __init__(self, *args: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
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
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server was not healthy within {timeout} s:\n{self.log()}")

    def worker_pid(self) -> int:
        """The pid of the model worker process the server spawned."""
        import psutil

        workers = [
            child for child in psutil.Process(self.proc.pid).children()
            if "spawn_main" in " ".join(child.cmdline())  # not multiprocessing's resource tracker
        ]
        assert len(workers) == 1, [child.cmdline() for child in workers]
        return int(workers[0].pid)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)
