"""A CPU worker's threads: as many as the cores it may use, split between ranks, or the
user's OMP_NUM_THREADS."""

from __future__ import annotations

import os

import pytest

from engine.worker import cpu_threads
from engine.worker.cpu_threads import worker_threads


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
