"""The tokenizer's executor: calls in order, errors handed back, and a call in flight never
holds up the process's exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from openai_compat.daemon_executor import DaemonThreadExecutor


def test_calls_run_in_order_and_errors_reach_the_caller() -> None:
    executor = DaemonThreadExecutor("test")
    seen: list[int] = []
    futures = [executor.submit(seen.append, i) for i in range(20)]
    failing = executor.submit(int, "x")
    for f in futures:
        f.result(timeout=5)
    assert seen == list(range(20))
    with pytest.raises(ValueError):
        failing.result(timeout=5)
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(print)


def test_shutdown_cancels_what_waits() -> None:
    executor = DaemonThreadExecutor("test")
    started = threading.Event()
    release = threading.Event()
    running = executor.submit(lambda: (started.set(), release.wait(5)))
    assert started.wait(5)
    waiting = executor.submit(time.sleep, 0)
    executor.shutdown(wait=False, cancel_futures=True)
    assert waiting.cancelled()
    release.set()
    running.result(timeout=5)


def test_asyncio_can_await_it() -> None:
    executor = DaemonThreadExecutor("test")

    async def main() -> int:
        return await asyncio.get_running_loop().run_in_executor(executor, sum, [1, 2, 3])

    assert asyncio.run(main()) == 6
    executor.shutdown()


def test_a_call_in_flight_does_not_hold_up_the_exit() -> None:
    code = (
        "import time\n"
        "from openai_compat.daemon_executor import DaemonThreadExecutor\n"
        "e = DaemonThreadExecutor('slow')\n"
        "e.submit(time.sleep, 60)\n"
        "time.sleep(0.2)\n"
        "e.shutdown(wait=False, cancel_futures=True)\n"
    )
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert time.monotonic() - start < 20


def test_a_second_shutdown_may_wait_for_the_first() -> None:
    executor = DaemonThreadExecutor("test")
    release = threading.Event()
    executor.submit(release.wait, 5)
    executor.shutdown(wait=False)
    release.set()
    executor.shutdown(wait=True)  # joins the thread the first call left running
    assert not executor._thread.is_alive()
