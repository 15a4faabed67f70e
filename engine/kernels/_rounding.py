"""Rounding float32 to a narrower float dtype inside a kernel, the same everywhere.

The kernels follow the torch reference op by op, rounding intermediates to the activation
dtype where torch does. On a GPU `x.to(tl.bfloat16)` rounds to nearest even, but Triton's CPU
interpreter truncates; `round_to` does the bfloat16 rounding with integer ops so that both
give torch's result bit for bit (a few integer ops, nothing next to the memory traffic).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 x -> x rounded to nearest even in `dtype` (a tensor of that dtype)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        # Add just under half a bfloat16 ulp, plus one when the kept lsb is odd (ties to even),
        # then drop the low 16 bits; a carry into the exponent is the correct rounding up.
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        y = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))  # NaN stays NaN
        return y.to(tl.bfloat16)  # exact: y is representable
    else:
        return x.to(dtype)
