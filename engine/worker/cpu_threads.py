"""How many threads a CPU worker computes with, and how they wait between parallel regions.

A CPU worker runs torch's kernels on its own thread pool (OpenMP). Its size is, in order:
`OMP_NUM_THREADS` when the user sets it (per worker), else the cores this process may run on
(`os.sched_getaffinity`, so `taskset -c 0-7 lightgate serve` gives 8 threads on those cores)
split evenly between the tensor-parallel ranks, at least one. More threads than cores would
make every parallel region wait for a thread that is not running.

Between two parallel regions (every projection, attention, norm of a decode step: a few
hundred a step) OpenMP's idle threads spin by default before they sleep. That is right on a
machine the worker has to itself, but where other processes want the same cores (the server
process, the client, other programs), a spinning thread holds a core that the thread a region
waits for could run on, and a decode step takes several times longer. A CPU worker therefore
starts with `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep at once) unless the user set
`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`; `OMP_WAIT_POLICY=ACTIVE lightgate serve` brings back
spinning for a dedicated machine. OpenMP reads these when torch loads, so they are set in the
environment the worker process is started with (`worker_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# The user's own choices of how OpenMP threads wait: any one of them set, nothing is changed.
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; all of them where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def worker_threads(tp_size: int) -> int:
    """Compute threads of one CPU worker of `tp_size` (see the module docstring)."""
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    return max(1, usable_cores() // max(1, tp_size))


def worker_env_overrides(device: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables a worker on `device` is started with, beyond the server's own environment."""
    environ = dict(os.environ) if environ is None else environ
    if device != "cpu" or any(name in environ for name in _WAIT_SETTINGS):
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


@contextmanager
def worker_environment(device: str) -> Iterator[None]:
    """`os.environ` with `worker_env_overrides(device)` while workers are started (a spawned
    process inherits the environment at its start); the server's own is restored after."""
    overrides = worker_env_overrides(device)
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
