"""How many threads a CPU worker computes with, and how they wait between parallel regions.

A CPU worker runs torch's kernels on its own thread pool (OpenMP). Its size is, in order:
`OMP_NUM_THREADS` when the user sets it (per worker), else the cores this process may run on
(`os.sched_getaffinity`, so `taskset -c 0-7 lightgate serve` gives 8 threads on those cores)
split evenly between the tensor-parallel ranks, at least one. More threads than cores would
make every parallel region wait for a thread that is not running.

How idle threads wait between parallel regions (a few hundred a decode step) is OpenMP's
setting, read when torch loads, and left to the user: by default they spin a while before they
sleep, the faster choice where the worker has its cores to itself; on a machine shared with
busy processes `OMP_WAIT_POLICY=PASSIVE` (sleep at once) is much faster, since a spinning
thread holds a core that the thread a region waits for could run on (docs/benchmarks.md,
"CPU, served: one stream's step beyond its matmuls").
"""

from __future__ import annotations

import os


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

