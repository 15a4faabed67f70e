"""Decode and prefill attention kernel times on the GPU, bf16 KV beside int8 KV.

    python scripts/attention_bench.py [--batches 1,64,256] [--lens 512,2048,4096] [--alibi]
    TRITON_INTERPRET=1 python scripts/attention_bench.py --device cpu --batches 2 --lens 64 --prefill-tokens 64
        (a check of the script itself, under the CPU interpreter: no graphs, times meaningless)

Llama-8B's attention shape (32 query heads, 8 KV heads, head_dim 128), a pool with the
sequences' slots scattered at random, launches captured in a CUDA graph and replayed (the
way decode steps run), so the times are GPU time without launch overhead. Each row prints
the time and the KV bytes read per second, against the HBM bandwidth the decode kernel is
bound by; int8 reads about half the bytes, so it should take about half the time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import engine.kernels.decode_attention as decode_module
import engine.kernels.prefill_attention as prefill_module
from engine.kernels.decode_attention import decode_attention, graph_num_splits
from engine.kernels.prefill_attention import prefill_attention
from engine.kernels.timing import graph_time_ms
from engine.layers.alibi import alibi_slopes

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DEVICE = "cuda"
# (label, int8 pool, int8 -> fp16 conversion, int8 launch (keys per block, warps, stages) or
# None: the float pools' (64, 4, 2)). Conversions: "pinned" inline PTX kept where the block is
# loaded (decode_attention.INT8_PINNED), "asm" the same PTX left free to move, "add" the
# add-and-bitcast way the CPU interpreter runs (engine/kernels/_int8.py). "int8": the defaults
# (INT8_PINNED, INT8_TC_LAUNCH); "int8-nNwWsS": pinned, another launch; "int8-pure-...": "asm".
# The prefill kernel has one int8 path: it runs bf16 and int8 only.
_DEFAULT_LAUNCH = decode_module.INT8_TC_LAUNCH
_DEFAULT_CONVERSION = "pinned" if decode_module.INT8_PINNED else "asm"
VARIANTS = [
    ("bf16", False, "asm", None),
    ("int8", True, _DEFAULT_CONVERSION, _DEFAULT_LAUNCH),
    ("int8-pure", True, "asm", _DEFAULT_LAUNCH),
    ("int8-add", True, "add", _DEFAULT_LAUNCH),
    ("int8-n64w4s3", True, "pinned", (64, 4, 3)),
    ("int8-pure-n64w4s3", True, "asm", (64, 4, 3)),  # the default before 2026-12-01's last run
    ("int8-n64w4s2", True, "pinned", (64, 4, 2)),
    ("int8-n128w4s2", True, "pinned", (128, 4, 2)),
    ("int8-n128w4s4", True, "pinned", (128, 4, 4)),
    ("int8-n128w8s3", True, "pinned", (128, 8, 3)),
]


_FLOAT_LAUNCH = decode_module.FLOAT_LAUNCH


def use_variant(conversion: str, launch: tuple[int, int, int] | None, float_launch=_FLOAT_LAUNCH) -> None:
    decode_module.INT8_ASM = conversion != "add"
    decode_module.INT8_PINNED = conversion == "pinned"
    decode_module.INT8_TC_LAUNCH = launch
    decode_module.FLOAT_LAUNCH = float_launch


def time_ms(fn) -> float:
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    return graph_time_ms(fn, iters=30)


def make_pool(batch: int, seq_len: int, int8: bool, gen: torch.Generator) -> dict:
    num_slots = batch * seq_len
    perm = torch.randperm(num_slots, generator=gen)
    req_to_token = perm.view(batch, seq_len).to(torch.int32)
    shape = (num_slots + 1, KV_HEADS, HEAD_DIM)
    if int8:
        k = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
        v = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
        k_scale = (torch.rand(num_slots + 1, KV_HEADS, generator=gen) / 64).to(torch.bfloat16)
        v_scale = (torch.rand(num_slots + 1, KV_HEADS, generator=gen) / 64).to(torch.bfloat16)
    else:
        k = torch.randn(shape, generator=gen).to(torch.bfloat16)
        v = torch.randn(shape, generator=gen).to(torch.bfloat16)
        k_scale = v_scale = None
    pool = {"k": k, "v": v, "k_scale": k_scale, "v_scale": v_scale, "req_to_token": req_to_token}
    return {name: t.to(DEVICE) if t is not None else None for name, t in pool.items()}


def kv_bytes(batch: int, seq_len: int, int8: bool) -> int:
    per_token = 2 * KV_HEADS * (HEAD_DIM * (1 if int8 else 2) + (2 if int8 else 0))
    return batch * seq_len * per_token


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--lens", default="512,2048,4096")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="one fresh prompt of this length")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefill-launches", default=",".join(map(str, prefill_module.PREFILL_LAUNCH)),
                        help="prefill launches to time, 'M,N,warps,stages;...' (default: the engine's)")
    parser.add_argument("--variants", default="", help="comma-separated labels to run (default: all)")
    parser.add_argument("--decode-launches", default="",
                        help="more bf16 decode launches to time, 'N,warps,stages;...' (labels bf16-nNwWsS)")
    parser.add_argument("--alibi", action="store_true", help="with BLOOM's ALiBi slopes (labels end in -alibi)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    wanted = [label for label in args.variants.split(",") if label]
    unknown = set(wanted) - {v[0] for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {[v[0] for v in VARIANTS]}")
    variants = [(*v, _FLOAT_LAUNCH) for v in VARIANTS if not wanted or v[0] in wanted]
    for item in (x for x in args.decode_launches.split(";") if x):
        n, w, st = (int(x) for x in item.split(","))
        variants.append((f"bf16-n{n}w{w}s{st}", False, "asm", None, (n, w, st)))
    gen = torch.Generator().manual_seed(0)
    slopes = alibi_slopes(HEADS).to(DEVICE) if args.alibi else None
    suffix = "-alibi" if args.alibi else ""
    rows = []
    print(f"{'kernel':<8} {'kv':<20} {'batch':>5} {'len':>5} {'ms':>8} {'GB/s':>7}")
    for batch in (int(b) for b in args.batches.split(",")):
        for seq_len in (int(n) for n in args.lens.split(",")):
            for kv, int8, conversion, launch, float_launch in variants:
                use_variant(conversion, launch, float_launch)
                pool = make_pool(batch, seq_len, int8, gen)
                q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16).to(DEVICE)
                rows_t = torch.arange(batch, device=DEVICE)
                lens = torch.full((batch,), seq_len, dtype=torch.int64, device=DEVICE)
                out = torch.empty_like(q)
                splits = graph_num_splits(q.device, batch, KV_HEADS, 8192)  # as in the engine's graphs

                def run(pool=pool, q=q, rows_t=rows_t, lens=lens, out=out, splits=splits) -> None:
                    decode_attention(q, pool["k"], pool["v"], pool["req_to_token"], rows_t, lens, HEAD_DIM**-0.5,
                                     out, k_scale=pool["k_scale"], v_scale=pool["v_scale"], num_splits=splits,
                                     alibi_slopes=slopes)

                ms = time_ms(run)
                kv += suffix
                gbs = kv_bytes(batch, seq_len, int8) / ms / 1e6
                print(f"{'decode':<8} {kv:<20} {batch:>5} {seq_len:>5} {ms:8.3f} {gbs:7.0f}")
                rows.append({"kernel": "decode", "kv": kv, "batch": batch, "len": seq_len, "ms": ms, "GB/s": gbs})
                del pool
    n = args.prefill_tokens
    launches = [tuple(int(x) for x in item.split(",")) for item in args.prefill_launches.split(";") if item]
    # The prefill kernel has no int8 variants: bf16 and int8 only, at each launch; --prefill-tokens 0
    # skips it.
    cases = [(kv, int8, conversion, launch, pl) for pl in launches for kv, int8, conversion, launch in VARIANTS[:2]]
    for kv, int8, conversion, launch, prefill_launch in cases if n > 0 else []:
        use_variant(conversion, launch)
        prefill_module.PREFILL_LAUNCH = prefill_launch  # type: ignore[assignment]
        kv = f"{kv}-m{prefill_launch[0]}n{prefill_launch[1]}w{prefill_launch[2]}s{prefill_launch[3]}{suffix}"
        pool = make_pool(1, n, int8, gen)
        q = torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16).to(DEVICE)
        zero = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        cu = torch.tensor([0, n], dtype=torch.int64, device=DEVICE)
        out = torch.empty_like(q)

        def run_prefill(pool=pool, q=q, zero=zero, cu=cu, out=out) -> None:
            prefill_attention(q, pool["k"], pool["v"], pool["req_to_token"], zero, zero, cu, HEAD_DIM**-0.5, out,
                              k_scale=pool["k_scale"], v_scale=pool["v_scale"], max_new_len=n, alibi_slopes=slopes)

        ms = time_ms(run_prefill)
        tflops = 2 * 2 * HEADS * HEAD_DIM * n * n / 2 / ms / 1e9  # causal: half the square
        print(f"{'prefill':<8} {kv:<20} {1:>5} {n:>5} {ms:8.3f} {tflops:6.0f} TFLOP/s")
        rows.append({"kernel": "prefill", "kv": kv, "batch": 1, "len": n, "ms": ms, "TFLOP/s": tflops})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
