"""Profile decode steps of the default model in one process (no worker, no scheduler).

    .venv/bin/python scripts/profile_decode.py --dtype bfloat16 --batch 16
    .venv/bin/python scripts/profile_decode.py --model DIR --threads 1 --cprofile

Prefills `--batch` sequences of `--context` tokens, then times greedy decode steps of
`ModelRunner.execute` (median and fastest; wall time, and the process's CPU time with the part
spent in GGUF block products called from Python: the LM head, and the layers' products unless
they run as one op, `engine/models/cpu_decode_layer.py`; `--module-path` turns that op off)
and prints the torch profiler's table of the heaviest ops, or with `--cprofile` the Python profile of the timed steps. A model of the same
depth but tiny width (`--model`) costs little in its matmuls: its step is the work around them.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine.config import EngineConfig
from engine.messages import NewRow, SeqStep, StepPlan
from engine.models import load_hf_config, load_model, resolve_model
from engine.models.llama import PreNormDecoderLayer
from engine.models.quantize import quantize_model_weights
from engine.sampling_params import SamplingParams
from engine.worker.model_runner import ModelRunner


def _time_gguf_products() -> list[float]:
    """Wrap the GGUF product so that each call adds its CPU time to the returned cell."""
    from engine.layers import gguf_linear

    cell = [0.0]
    product = gguf_linear.gguf_mm

    def timed(x: torch.Tensor, weight: torch.Tensor, qtype: int, int8_activations: bool = False) -> torch.Tensor:
        start = time.process_time()
        out = product(x, weight, qtype, int8_activations)
        cell[0] += time.process_time() - start
        return out

    gguf_linear.gguf_mm = timed
    return cell


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--weight-quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--gguf-weights", default="quantized", choices=["quantized", "dequantized"])
    parser.add_argument("--gguf-activations", default="auto", choices=["auto", "int8", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--by-shape", action="store_true", help="split the table by input shapes")
    parser.add_argument("--rows", type=int, default=15, help="rows of the table")
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cprofile", action="store_true", help="a cProfile of the timed steps instead")
    parser.add_argument(
        "--module-path", action="store_true", help="decoder layers through their modules, not the one-op CPU decode layer"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model(args.model)
    config = EngineConfig(dtype=args.dtype, device="cpu").resolve(max_position_embeddings=8192)
    gguf_weights = args.gguf_weights if args.weight_quantization == "none" else "dequantized"  # as the worker
    model = load_model(
        path, config.torch_dtype(), "cpu", gguf_weights=gguf_weights, gguf_activations=args.gguf_activations
    )
    if args.weight_quantization != "none":
        quantize_model_weights(model, args.weight_quantization)
    if args.module_path:
        for layer in model.modules():
            if isinstance(layer, PreNormDecoderLayer):
                layer.fused_decode = None
    runner = ModelRunner(config, model, load_hf_config(path))
    params = SamplingParams(temperature=0.0, max_tokens=1000)
    batch, length = args.batch, args.context
    prompt = list(range(100, 100 + length))
    seqs = [
        SeqStep(
            row=b,
            start_pos=0,
            token_ids=prompt,
            out_slots=list(range(b * length, (b + 1) * length)),
            sample=True,
            new_row=NewRow(params, prompt, []),
        )
        for b in range(batch)
    ]
    runner.execute(StepPlan(0, seqs))
    next_slot, pos = batch * length, length

    def step(step_id: int) -> None:
        nonlocal next_slot, pos
        plan = StepPlan(
            step_id,
            [
                SeqStep(row=b, start_pos=pos, token_ids=[5], out_slots=[next_slot + b], sample=True)
                for b in range(batch)
            ],
        )
        next_slot, pos = next_slot + batch, pos + 1
        runner.execute(plan)

    for i in range(3):
        step(i)
    in_gguf = _time_gguf_products()
    times, cpu_times, gguf_times = [], [], []
    for i in range(args.steps):
        in_gguf[0] = 0.0
        start, cpu_start = time.perf_counter(), time.process_time()
        step(i)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        gguf_times.append(in_gguf[0])
    # CPU time (all of the process's threads) is what a shared machine leaves comparable
    print(
        f"{args.dtype}, weights {args.weight_quantization}, GGUF {gguf_weights} "
        f"({args.gguf_activations} activations), batch {batch}, "
        f"{torch.get_num_threads()} threads: {statistics.median(times) * 1e3:.2f} ms per step (median), "
        f"{min(times) * 1e3:.2f} ms (min); CPU time {statistics.median(cpu_times) * 1e3:.2f} ms (median), "
        f"{min(cpu_times) * 1e3:.2f} ms (min), of which in GGUF products called from Python {statistics.median(gguf_times) * 1e3:.2f} ms"
    )
    if args.cprofile:
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(args.steps):
            step(i)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)
        return
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for i in range(5):
            step(i)
    table = prof.key_averages(group_by_input_shape=args.by_shape)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
