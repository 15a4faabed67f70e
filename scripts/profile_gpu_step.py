"""Where a GPU step's time goes, in one process (no server, no scheduler, no worker pipe).

    python scripts/profile_gpu_step.py MODEL_DIR [--steps 20]

For decode steps at several batch sizes (graphed and eager) and for mixed steps (decodes plus
a prefill chunk of `--chunk` tokens, in prompts of `--prompt-len`) it prints the wall time per
step next to the GPU time of the same step (CUDA events), so host overhead shows as the gap,
the GEMM rate that GPU time means (2 x the linear layers' weights per token, attention left
out), and a cProfile table of the eager decode step's heaviest Python functions.

    # offline1000's ramp: 8 192-token chunks of ~600-token prompts beside the running decodes
    python scripts/profile_gpu_step.py MODEL_DIR --batches 256 --chunk 8192 --prompt-len 600 --torch-profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from engine.config import EngineConfig
from engine.layers.backend import select_backend
from engine.layers.linear import LinearBase
from engine.messages import NewRow, SeqStep, StepPlan
from engine.models import load_hf_config, load_model
from engine.sampling_params import SamplingParams
from engine.worker.model_runner import ModelRunner


class Bench:
    def __init__(self, runner: ModelRunner, context: int) -> None:
        self.runner = runner
        self.context = context
        self.next_slot = 0
        self.step_id = 0
        self.pos: dict[int, int] = {}

    def prefill(self, rows: list[int]) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=100000)
        prompt = list(range(1000, 1000 + self.context))
        seqs = []
        for row in rows:
            slots = list(range(self.next_slot, self.next_slot + self.context))
            self.next_slot += self.context
            seqs.append(SeqStep(row=row, start_pos=0, token_ids=prompt, out_slots=slots, sample=True,
                                new_row=NewRow(params, prompt, [])))
            self.pos[row] = self.context
        for i in range(0, len(seqs), 8):  # chunks of 8 prompts
            self.run(seqs[i : i + 8])

    def decode_seqs(self, rows: list[int]) -> list[SeqStep]:
        seqs = []
        for row in rows:
            seqs.append(SeqStep(row=row, start_pos=self.pos[row], token_ids=[7], out_slots=[self.next_slot],
                                sample=True))
            self.next_slot += 1
            self.pos[row] += 1
        return seqs

    def run(self, seqs: list[SeqStep]) -> None:
        self.step_id += 1
        self.runner.execute(StepPlan(self.step_id, seqs))

    def timed(self, make_seqs, steps: int) -> tuple[float, float]:
        """(wall ms, GPU ms) per step (on the CPU, wall twice: a check of the script)."""
        on_gpu = torch.cuda.is_available()
        for _ in range(3):
            self.run(make_seqs())
        _sync()
        wall = gpu = 0.0
        for _ in range(steps):
            seqs = make_seqs()
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            self.run(seqs)
            if on_gpu:
                end.record()
            _sync()
            wall += time.perf_counter() - t0
            gpu += start.elapsed_time(end) / 1e3 if on_gpu else time.perf_counter() - t0
        return 1e3 * wall / steps, 1e3 * gpu / steps


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_profile(bench: Bench, make_seqs, title: str, steps: int = 5) -> None:
    """Kernel (GPU) and operator (host) times of `steps` steps, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        bench.run(make_seqs())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            bench.run(make_seqs())
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / steps / 1e3
    print(f"\n==== torch.profiler: {title}: wall {1e3 * wall:.2f} ms/step, kernels {gpu_total:.2f} ms/step")
    print(events.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))


def profile_config(args: argparse.Namespace, eager: bool, batches: list[int]) -> list[dict]:
    max_batch = max(batches)
    results = []
    prompt_len = min(args.prompt_len or args.chunk, args.chunk)
    num_prompts = -(-args.chunk // prompt_len)
    config = EngineConfig(model=args.model, device=args.device, enforce_eager=eager, max_num_seqs=max_batch + num_prompts,
                          kv_cache_memory_gb=args.kv_gb, enable_prefix_caching=False)
    hf_config = load_hf_config(args.model)
    config = config.resolve(max_position_embeddings=hf_config.max_position_embeddings)
    select_backend(args.device, "auto")
    model = load_model(args.model, config.torch_dtype(), args.device)
    # FLOPs per token of the linear layers (the lm head counts for sampled rows only)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, LinearBase))
    vocab, hidden = hf_config.vocab_size, hf_config.hidden_size

    def tflops(tokens: int, sampled: int, gpu_ms: float) -> float:
        return (2 * linear * tokens + 2 * vocab * hidden * sampled) / gpu_ms / 1e9

    bench = Bench(ModelRunner(config, model, hf_config), args.context)
    bench.prefill(list(range(max_batch)))
    for b in batches:
        wall, gpu = bench.timed(lambda b=b: bench.decode_seqs(list(range(b))), args.steps)
        results.append({"step": f"decode bs{b}", "graphs": not eager, "wall_ms": wall, "gpu_ms": gpu,
                        "tflops": tflops(b, b, gpu)})
    lens = [prompt_len] * (args.chunk // prompt_len) + ([args.chunk % prompt_len] if args.chunk % prompt_len else [])
    prompts = [list(range(2000 + 7 * j, 2000 + 7 * j + n)) for j, n in enumerate(lens)]
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def mixed(b: int) -> list[SeqStep]:
        seqs = bench.decode_seqs(list(range(b)))
        for j, prompt in enumerate(prompts):
            slots = list(range(bench.next_slot, bench.next_slot + len(prompt)))
            bench.next_slot += len(prompt)
            seqs.append(SeqStep(row=max_batch + j, start_pos=0, token_ids=prompt, out_slots=slots, sample=True,
                                new_row=NewRow(params, prompt, [])))
        return seqs

    for b in batches:
        wall, gpu = bench.timed(lambda b=b: mixed(b), max(3, args.steps // 4))
        results.append({"step": f"decode bs{b} + prefill {len(prompts)}x{prompt_len}", "graphs": not eager,
                        "wall_ms": wall, "gpu_ms": gpu, "tflops": tflops(b + args.chunk, b + len(prompts), gpu)})
    if args.torch_profile:
        torch_profile(bench, lambda: bench.decode_seqs([0]), f"decode bs1, graphs {not eager}")
        torch_profile(bench, lambda: mixed(max_batch), f"decode bs{max_batch} + prefill {len(prompts)}x{prompt_len}, "
                      f"graphs {not eager}")
    if not eager:
        return results
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        bench.run(bench.decode_seqs([0]))
    _sync()
    prof.disable()
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(30)
    print(f"cProfile of {args.steps} eager decode steps at bs1:\n{stream.getvalue()}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    parser.add_argument("--kv-gb", type=float, default=40.0, help="KV pool size")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--chunk", type=int, default=512, help="prefill tokens in a mixed step")
    parser.add_argument("--prompt-len", type=int, default=0, help="tokens per prompt of that chunk (0: one prompt)")
    parser.add_argument("--torch-profile", action="store_true",
                        help="also print torch.profiler tables (kernels, host ops) of a bs1 decode step "
                        "and of the largest mixed step")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = profile_config(args, False, batches)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    results += profile_config(args, True, batches)
    print(f"{'step':<34} {'graphs':>6} {'wall ms':>9} {'GPU ms':>9} {'GEMM TFLOP/s':>13}")
    for r in results:
        print(f"{r['step']:<34} {str(r['graphs']):>6} {r['wall_ms']:9.2f} {r['gpu_ms']:9.2f} {r['tflops']:13.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
