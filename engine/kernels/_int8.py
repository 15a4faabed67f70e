"""Reading int8 KV in the attention kernels: int8 -> fp16 without a conversion instruction.

An int8 pool stores K and V as integers with a scale per slot and kv head. The kernels turn
each loaded block into fp16 (every int8 value is exact in fp16) for the tensor-core dots and
apply the scales to the fp32 scores (K) and to the probabilities (V). A per-element
int-to-float conversion runs at a fraction of the arithmetic rate, which made the int8 pool's
attention slower than bf16's despite reading half the bytes; both ways below build the fp16
bits directly. The fp16 bits 0x64XX are the number 1024 + XX, so an int8 x (XX = x ^ 0x80,
i.e. x + 128 as unsigned) becomes 1152 + x, and subtracting 1152 leaves x exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Four int8 values in one 32-bit register -> four fp16 in two: flip the sign bits, place each
# byte under a 0x64 high byte (prmt selectors 0x4140 and 0x4342 pick bytes 0, 1 and 2, 3 of the
# value, each followed by byte 0 of 0x64646464), then subtract 1152 (0x6480) from both halves.
_INT8X4_TO_FP16X4 = tl.constexpr("""{
.reg .b32 t, hi, off;
mov.b32 hi, 0x64646464;
mov.b32 off, 0x64806480;
xor.b32 t, $2, 0x80808080;
prmt.b32 $0, t, hi, 0x4140;
prmt.b32 $1, t, hi, 0x4342;
sub.f16x2 $0, $0, off;
sub.f16x2 $1, $1, off;
}""")


@triton.jit
def int8_to_fp16(x, USE_ASM: tl.constexpr):
    """int8 tensor -> the same integers in fp16. USE_ASM (a GPU launch): four values per
    register in five instructions (inline PTX); otherwise an integer add and a bitcast, which
    the CPU interpreter runs too."""
    if USE_ASM:
        y = tl.inline_asm_elementwise(
            _INT8X4_TO_FP16X4, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4
        )
    else:
        bits = (x.to(tl.int32) + 0x6480).to(tl.int16)
        y = (bits.to(tl.float16, bitcast=True) - 1152.0).to(tl.float16)
    return y
