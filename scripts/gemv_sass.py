"""Compile the decode GEMV (`engine/kernels/gemv.py`) for a GPU on a machine without one.

For each of an 8B Llama layer's four products, weight kind (bf16, FP8) and row count, the
launch the engine takes (the measured table, else the default rule) or `--launch`, specialized as
the JIT launcher would: registers, local memory (spills), shared memory, the widths of the global
loads, and the layout conversions inside each K loop (each one a trip through shared memory with a
barrier: the amax loop of FP8 first, then the product's loop, which should have none).

    python scripts/gemv_sass.py                          # rows 1 and 8, the engine's launches
    python scripts/gemv_sass.py --rows 1 --launch 16,1024,2,4,1 --out /tmp/gemv
    # --launch BLOCK_N,BLOCK_K,SPLIT_K,num_warps[,last_finishes 0/1]

Counts and registers, not times: a guide to compare variants by before a GPU measures them.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.kernels import gemv as gemv_module
from engine.kernels.gemv import GemvLaunch, launch_for, split_plan, vec_of

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)


def compile_gemv(rows: int, n: int, k: int, fp8: bool, cfg: GemvLaunch, arch: int) -> dict[str, str]:
    """The kernel for x [rows, k] bf16 and a contiguous [n, k] weight, no bias."""
    plan = split_plan(rows, k, cfg)
    ints = {"M": rows, "N": n, "K": k, "k_per_split": plan.k_per_split, "stride_xm": k, "stride_wn": k,
            "stride_om": n}
    constexprs: dict[str, object] = dict(
        BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=plan.even_k,
        SPLIT=plan.num_splits > 1, LAST_FINISHES=plan.num_splits > 1 and cfg.last_finishes, FP8=fp8,
        HAS_BIAS=False, VEC=vec_of(cfg))
    pointers = {"x_ptr": "bf16", "w_ptr": "fp8e4nv" if fp8 else "bf16", "out_ptr": "bf16", "partial_ptr": "fp32",
                "x_scale_ptr": "fp32", "w_scale_ptr": "fp32", "bias_ptr": "bf16", "counter_ptr": "i32"}
    params = gemv_module._gemv_kernel.arg_names
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for i, p in enumerate(params):
        if p in constexprs:
            signature[p] = "constexpr"
        elif p in pointers:
            signature[p], attrs[(i,)] = "*" + pointers[p], [["tt.divisibility", 16]]
        elif ints[p] == 1:  # the launcher specializes ints equal to 1 as constants
            signature[p], constexprs[p] = "constexpr", 1
        else:
            signature[p] = "i32"
            if ints[p] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(gemv_module._gemv_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": 1})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"gemv_sass_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink()
    return {"ptx": compiled.asm["ptx"], "ttgir": compiled.asm["ttgir"], "usage": usage}


def loop_conversions(ttgir: str) -> list[int]:
    """Layout conversions in each `scf.for` body, in order."""
    counts = []
    for body in re.findall(r"scf\.for(.*?)scf\.yield", ttgir, flags=re.S):
        counts.append(body.count("ttg.convert_layout"))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8", help="activation rows (1..8)")
    parser.add_argument("--launch", default="", help="BLOCK_N,BLOCK_K,SPLIT_K,num_warps[,last_finishes] "
                        "(default: the engine's)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--out", type=Path, help="a folder for the .ptx and .ttgir")
    args = parser.parse_args()
    for rows in (int(r) for r in args.rows.split(",")):
        for (name, (k, n)), fp8 in ((item, fp8) for fp8 in (False, True) for item in SHAPES.items()):
            numbers = [int(v) for v in args.launch.split(",")] if args.launch else []
            cfg = GemvLaunch(*numbers[:4], *(bool(v) for v in numbers[4:5])) if numbers else launch_for(
                rows, n, k, fp8, torch.device("cpu"))
            asm = compile_gemv(rows, n, k, fp8, cfg, args.arch)
            loads = collections.Counter(re.findall(r"ld\.global[.\w]*", asm["ptx"]))
            usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", asm["usage"])
            regs, stack, shared, local = usage.groups() if usage else ("?",) * 4
            label = f"{'fp8' if fp8 else 'bf16'}-{name}-m{rows}"
            print(f"{label:18s} {cfg}: {regs} registers, {local} B local, {stack} B stack, {shared} B shared; "
                  f"loop conversions {loop_conversions(asm['ttgir'])}; loads {dict(loads)}", flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                for ext in ("ptx", "ttgir"):
                    (args.out / f"{label}.{ext}").write_text(asm[ext])


if __name__ == "__main__":
    main()
