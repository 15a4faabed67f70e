"""The router's admission check: would the running sequences and one more still fit in the KV
pool at their predicted peak?

Each running sequence is a pair [remaining, used]: `remaining` tokens it is still predicted to
generate (one per step), `used` slots it holds now or will hold once its known tokens are
computed. If every sequence keeps generating one token per step until its predicted end, pool
use peaks when one of them finishes, and `future_peak` finds that peak without simulating the
steps: sorted by remaining tokens, longest first, the i-th sequence's end is when the first i
are all still growing.
"""

from __future__ import annotations

from collections.abc import Iterable


def future_peak(entries: Iterable[tuple[int, int]]) -> int:
    """Peak pool use if every sequence runs to its predicted end. entries: (remaining, used)."""
    peak = held = 0
    for i, (remaining, used) in enumerate(sorted(entries, key=lambda e: -e[0])):
        held += used
        peak = max(peak, remaining * (i + 1) + held)
    return peak


class FutureUsage:
    """The [remaining, used] pairs of what runs plus the candidates admitted so far in a step.

    With `shared_prefixes` (no prefix cache), a prompt prefix that siblings of one request
    (n > 1) share is counted once, on the sibling predicted to live longest, which frees it
    last. With the prefix cache, shared and cached prefixes are left out of `used`: they count
    in the pool's limit instead.
    """

    def __init__(self, shared_prefixes: bool) -> None:
        self.entries: list[list[int]] = []
        self._shared_prefixes = shared_prefixes
        self._holders: dict[str, int] = {}  # request id -> the entry that counts its shared prefix

    def add(self, request_id: str, remaining: int, used: int, prefix: int) -> None:
        """A sequence with `remaining` tokens to generate and `used` slots, `prefix` of them shared."""
        self.entries.append([remaining, used - prefix])
        if not prefix or not self._shared_prefixes:
            return
        j = self._holders.get(request_id)
        if j is not None and self.entries[j][0] >= remaining:
            return
        if j is not None:
            self.entries[j][1] -= prefix
        self.entries[-1][1] += prefix
        self._holders[request_id] = len(self.entries) - 1

    def peak(self) -> int:
        return future_peak((remaining, used) for remaining, used in self.entries)
