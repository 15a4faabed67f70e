"""What a parallel region costs under OpenMP's wait policies: one decode-sized projection
(1 x 576 by a packed 1728 x 576 float32 weight, the default model's gate/up) and an add, back
to back, timed one by one; prints the 1st, 10th and 50th percentiles.

    OMP_WAIT_POLICY=PASSIVE python scripts/omp_wait_bench.py --threads 2
    python scripts/omp_wait_bench.py --threads 2     # OpenMP's default (spin, then sleep)

The low percentiles are the moments both threads had a core: there the difference between
the policies is the cost of waking a sleeping thread for each region.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.layers.cpu_gemm import pack_weight, packed_linear


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 576)
    packed = pack_weight(torch.randn(1728, 576))
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        packed_linear(x, packed, None)
        x + 1
        times.append(time.perf_counter() - start)
    times.sort()
    n = len(times)
    print(f"p1 {times[n // 100] * 1e6:.1f} p10 {times[n // 10] * 1e6:.1f} p50 {times[n // 2] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
