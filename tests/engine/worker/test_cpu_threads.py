"""A CPU worker's threads: as many as the cores it may use (or the user's OMP_NUM_THREADS),
idle threads that sleep unless the user asked otherwise, the server's environment untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.worker import cpu_threads
from engine.worker.cpu_threads import worker_env_overrides, worker_environment, worker_threads
from tests.engine.models.harness import save_tiny_model, tiny_config


def test_threads_follow_affinity_split_between_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 8)
    assert worker_threads(1) == 8
    assert worker_threads(2) == 4
    assert worker_threads(16) == 1  # never none


def test_usable_cores_is_the_affinity_set() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert cpu_threads.usable_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["3", " 3 "])
def test_user_thread_count_wins(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert worker_threads(2) == 3


@pytest.mark.parametrize("value", ["0", "", "four", "-2"])
def test_unusable_thread_count_is_ignored(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 6)
    assert worker_threads(1) == 6


def test_wait_policy_only_for_cpu_workers_the_user_left_alone() -> None:
    assert worker_env_overrides("cpu", {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert worker_env_overrides("cpu", {"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert worker_env_overrides("cpu", {"GOMP_SPINCOUNT": "100000"}) == {}
    assert worker_env_overrides("cuda:0", {}) == {}


def test_environment_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with worker_environment("cpu"):
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads a process's environment from /proc")
def test_a_cpu_worker_starts_with_sleeping_idle_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01) as llm:
        assert llm._core is not None
        (pid,) = llm._core.worker.pids
        assert pid is not None
        assert _environ_of(pid).get("OMP_WAIT_POLICY") == "PASSIVE"
        assert "OMP_WAIT_POLICY" not in os.environ  # the server's own stays as it was
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
