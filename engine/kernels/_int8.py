"""Reading int8 KV in the decode attention kernel: int8 -> fp16 without a conversion instruction.

An int8 pool stores K and V as integers with a scale per slot and kv head. The kernel turns
each loaded block into fp16 (every int8 value is exact in fp16) for the tensor-core dots and
applies the scales to the fp32 scores (K) and to the probabilities (V). Both ways below build
the fp16 bits directly: the bits 0x64XX are the number 1024 + XX, so an int8 x (XX = x ^ 0x80,
i.e. x + 128 as unsigned) becomes 1152 + x, and subtracting 1152 leaves x exactly.

On an H200 the inline-PTX way and the add-and-bitcast way time about the same
(scripts/attention_bench.py; docs/benchmarks.md, run of 2026-12-01 18:32), so the conversion is
not what keeps the int8 kernel below the bf16 kernel's bandwidth.
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
def int8_to_fp16(x, USE_ASM: tl.constexpr, PINNED: tl.constexpr = False):
    """int8 tensor -> the same integers in fp16. USE_ASM (a GPU launch): four values per
    register in five instructions (inline PTX); otherwise an integer add and a bitcast, which
    the CPU interpreter runs too.

    PINNED marks the PTX as having effects, so the compiler keeps the conversion where the
    block was loaded (16-byte rows of consecutive values) and moves the fp16 result to the dot's
    operand layout through shared memory with `ldmatrix`, as for a bf16 block. Pure, it may sink
    the conversion past that layout change, and then reads the int8 block from shared memory in
    the operand layout: for the values ([keys, D], the keys being the dot's inner dimension) one
    byte at a time, 64 byte loads per thread per block (compiled for sm_90).
    """
    if USE_ASM:
        y = tl.inline_asm_elementwise(
            _INT8X4_TO_FP16X4, "=r,=r,r", [x], dtype=tl.float16, is_pure=not PINNED, pack=4
        )
    else:
        bits = (x.to(tl.int32) + 0x6480).to(tl.int16)
        y = (bits.to(tl.float16, bitcast=True) - 1152.0).to(tl.float16)
    return y


@triton.jit
def int8_pv_dot(p, v, v_scale, USE_ASM: tl.constexpr, DOT_PRECISION: tl.constexpr, PINNED: tl.constexpr = False):
    """sum_n p[m, n] * v_scale[n] * v[n, :] as one fp16 dot ([M, N] fp32 probabilities, [N, D]
    int8 values, [N] fp32 scales -> [M, D] fp32). The scales go on the probabilities, divided
    by the block's largest (fp16 has no exponent room for scales of 1e-6), which multiplies the
    fp32 result instead."""
    s_max = tl.max(v_scale, 0)
    s_max = tl.where(s_max > 0.0, s_max, 1.0)
    pv = p * (v_scale / s_max)[None, :]
    return tl.dot(pv.to(tl.float16), int8_to_fp16(v, USE_ASM, PINNED), input_precision=DOT_PRECISION) * s_max
