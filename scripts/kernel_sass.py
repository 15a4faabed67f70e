"""Compile an attention kernel for a GPU on a machine without one, and count its instructions.

Triton compiles down to SASS without a GPU (the bundled ptxas and nvdisasm do the last steps),
so a kernel's shape can be read before any device time is spent on it: how its blocks reach
the tensor cores (`LDSM` = ldmatrix, `LDS.U8` = one byte per shared-memory load), whether its
global loads are pipelined (`LDGSTS` = cp.async), how many conversions it does. The launch is
specialized as the JIT launcher would at the 8B shape (32 heads, 8 KV heads, head dim 128):
strides of 1 become constants, multiples of 16 get the divisibility hint.

    python scripts/kernel_sass.py decode --kv int8                  # the int8 decode, default launch
    python scripts/kernel_sass.py decode --kv int8 --pinned --launch 64,4,3
    python scripts/kernel_sass.py decode --kv bf16
    python scripts/kernel_sass.py prefill --kv int8 --out /tmp/sass  # also writes .ptx/.ttgir/.sass
    python scripts/kernel_sass.py prefill --kv bf16 --alibi          # with ALiBi's slopes (BLOOM)

Counts are of the whole kernel's code (prologue, pipelined loop copies and epilogue), a guide
to compare variants by, not a time.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.kernels import decode_attention as decode_module
from engine.kernels import prefill_attention as prefill_module

HEADS, KV_HEADS, HEAD_DIM, SPLITS, MAX_LEN = 32, 8, 128, 4, 8192

# Strides and sizes of a launch at the 8B shape (pool [slots, KV, D], scales [slots, KV],
# req_to_token [rows, MAX_LEN], decode scratch [B, H, SPLITS, D]).
_POOL = dict(stride_ks=KV_HEADS * HEAD_DIM, stride_kh=HEAD_DIM, stride_kd=1, stride_vs=KV_HEADS * HEAD_DIM,
             stride_vh=HEAD_DIM, stride_vd=1, stride_kss=KV_HEADS, stride_ksh=1, stride_vss=KV_HEADS, stride_vsh=1,
             stride_rr=MAX_LEN, stride_rp=1, window=0)
_VALUES = {
    "decode": dict(_POOL, stride_qb=HEADS * HEAD_DIM, stride_qh=HEAD_DIM, stride_qd=1,
                   stride_mob=HEADS * SPLITS * HEAD_DIM, stride_moh=SPLITS * HEAD_DIM, stride_mos=HEAD_DIM,
                   stride_mod=1, stride_mlb=HEADS * SPLITS, stride_mlh=SPLITS, stride_mls=1, num_splits=SPLITS,
                   stride_ob=HEADS * HEAD_DIM, stride_oh=HEAD_DIM, stride_od=1),
    "prefill": dict(_POOL, stride_qt=HEADS * HEAD_DIM, stride_qh=HEAD_DIM, stride_qd=1, stride_ot=HEADS * HEAD_DIM,
                    stride_oh=HEAD_DIM, stride_od=1, stride_tile=4096),
}
# Element types of the pointer arguments (K and V: the pool's; any other: int64 metadata).
_POINTERS = {"q_ptr": "bf16", "out_ptr": "bf16", "k_scale_ptr": "bf16", "v_scale_ptr": "bf16",
             "req_to_token_ptr": "i32", "tiles_ptr": "i32", "mid_o_ptr": "fp32", "mid_lse_ptr": "fp32",
             "slopes_ptr": "fp32"}

SASS_COUNTS = [
    ("LDG (global loads)", r"\bLDG\b"), ("LDGSTS (cp.async)", r"\bLDGSTS\b"), ("LDS (shared loads)", r"\bLDS\b"),
    ("LDS.U8 (byte loads)", r"\bLDS\.U8\b"), ("STS (shared stores)", r"\bSTS\b"), ("LDSM (ldmatrix)", r"\bLDSM\b"),
    ("HMMA (mma)", r"\bHMMA\b"), ("HGMMA (wgmma)", r"\bHGMMA\b"), ("PRMT", r"\bPRMT\b"), ("I2F", r"\bI2F\b"),
    ("F2F", r"\bF2F\b"), ("SHFL", r"\bSHFL\b"), ("BAR", r"\bBAR\b"), ("instructions", r"/\*[0-9a-f]{4}\*/"),
]


def _constexprs(kernel: str, int8: bool, pinned: bool, block_n: int, alibi: bool = False) -> dict[str, object]:
    group = HEADS // KV_HEADS
    if kernel == "decode":
        return dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=HEAD_DIM, BLOCK_N=block_n,
                    HAS_WINDOW=False, IS_INT8=int8, INT8_AS_FP16=int8, INT8_ASM=True, INT8_PINNED=pinned,
                    DOT_PRECISION="tf32", DIRECT=False, HAS_ALIBI=alibi)
    block_m = prefill_module.prefill_block_m(_FakeCuda())
    return dict(GROUP=group, HEAD_DIM=HEAD_DIM, BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=False, IS_INT8=int8,
                DOT_PRECISION="tf32", USE_TILES=True, HAS_ALIBI=alibi)


class _FakeCuda:
    type = "cuda"  # what the launch-config helpers look at


def compile_kernel(
    kernel: str, int8: bool, pinned: bool, launch: tuple[int, int, int], arch: int, alibi: bool = False
) -> dict[str, str]:
    fn = decode_module._decode_split_kernel if kernel == "decode" else prefill_module._prefill_kernel
    block_n, num_warps, num_stages = launch
    constexprs = _constexprs(kernel, int8, pinned, block_n, alibi)
    values = _VALUES[kernel]
    params = list(inspect.signature(fn.fn).parameters)
    missing = [p for p in params if p not in constexprs and not p.endswith("_ptr") and p not in values
               and p != "sm_scale_log2"]
    if missing:
        raise SystemExit(f"no value for {missing}: update _VALUES to the kernel's signature")
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for i, p in enumerate(params):
        if p in constexprs:
            signature[p] = "constexpr"
        elif values.get(p) == 1:
            signature[p], constexprs[p] = "constexpr", 1
        elif p.endswith("_ptr"):
            kv_dtype = "i8" if int8 else "bf16"
            signature[p] = "*" + _POINTERS.get(p, kv_dtype if p in ("k_ptr", "v_ptr") else "i64")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p == "sm_scale_log2":
            signature[p] = "fp32"
        else:
            signature[p] = "i32"
            if values[p] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature=signature, constexprs={p: constexprs[p] for p in params if p in constexprs},
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"kernel_sass_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    finally:
        cubin.unlink()
    return {"ptx": compiled.asm["ptx"], "ttgir": compiled.asm["ttgir"], "sass": sass,
            "shared": str(compiled.metadata.shared)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=["decode", "prefill"])
    parser.add_argument("--kv", choices=["bf16", "int8"], default="int8")
    parser.add_argument("--pinned", action="store_true", help="decode: INT8_PINNED (engine/kernels/_int8.py)")
    parser.add_argument("--launch", default="", help="keys per block,warps,stages (default: the engine's)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--out", type=Path, help="a folder for the .ptx, .ttgir and .sass")
    parser.add_argument("--alibi", action="store_true", help="the ALiBi variant (HAS_ALIBI)")
    args = parser.parse_args()
    if args.launch:
        launch = tuple(int(x) for x in args.launch.split(","))
    elif args.kernel == "decode":
        int8_launch = decode_module.INT8_TC_LAUNCH if args.kv == "int8" else None
        launch = int8_launch or (decode_module._block_n(_FakeCuda()), 4, 2)
    else:
        _, block_n, warps, stages = prefill_module._launch_config(_FakeCuda(), HEAD_DIM)
        launch = (block_n, warps, stages)
    if len(launch) != 3:
        parser.error("--launch takes three numbers: keys per block, warps, stages")
    asm = compile_kernel(args.kernel, args.kv == "int8", args.pinned, launch, args.arch, args.alibi)
    name = f"{args.kernel}-{args.kv}{'-pinned' if args.pinned else ''}-n{launch[0]}w{launch[1]}s{launch[2]}"
    name += "-alibi" if args.alibi else ""
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for ext in ("ptx", "ttgir", "sass"):
            (args.out / f"{name}.{ext}").write_text(asm[ext])
    print(f"{name} (sm_{args.arch}), shared memory {asm['shared']} bytes")
    for label, pattern in SASS_COUNTS:
        print(f"  {label:<22} {len(re.findall(pattern, asm['sass'])):>6}")


if __name__ == "__main__":
    main()
