"""Where a server's threads spent their time, from py-spy's raw samples (`gpu_bench.sh` with PYSPY).

    python scripts/spy_summary.py spy_kv-auto.txt [--top 30] [--thread SUBSTRING] [--under SUBSTRING]

For each process and thread (busiest first): its sample count, then the functions holding the
most samples inclusively (a function counts once per sample, however deep it recurses) and
exclusively (the frame on top of the stack).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")  # "function (file:line)"
_PROCESS = re.compile(
    r'^process ([0-9]+):".*?";'
)  # a child's sample starts with its parents'; a command may hold ';'


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    function, path = m.groups()
    return f"{function} ({'/'.join(path.rsplit('/', 2)[-2:])})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--thread", default="", help="only threads whose process or thread name holds this")
    parser.add_argument(
        "--under", default="", help="only samples with a frame holding this (e.g. 'Server.serve')"
    )
    args = parser.parse_args()

    totals: Counter[tuple[str, str]] = Counter()
    inclusive: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    exclusive: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    with open(args.path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            process = ""
            while (m := _PROCESS.match(stack)) is not None:
                process, stack = m.group(1), stack[m.end() :]
            frames = stack.split(";")
            process = process or "-"  # recorded without --subprocesses
            if len(frames) < 2:
                continue
            key = (process, frames[0])  # the process id, "thread (TID)" or with its name
            if args.thread and args.thread not in " ".join(key):
                continue
            if args.under and args.under not in stack:
                continue
            n = int(count)
            totals[key] += n
            names = [_name(fr) for fr in frames[1:]]
            for name in set(names):
                inclusive[key][name] += n
            exclusive[key][names[-1]] += n
    for key, total in totals.most_common():
        if total < 10:
            continue
        print(f"\n== process {key[0]} {key[1]}: {total} samples")
        print(f"   {'incl %':>7} {'excl %':>7}  function")
        for name, n in inclusive[key].most_common(args.top):
            print(f"   {100 * n / total:7.1f} {100 * exclusive[key][name] / total:7.1f}  {name}")


if __name__ == "__main__":
    main()
