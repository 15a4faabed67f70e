"""The CPU comparison's tools: the K-quant writers of scripts/bench_gguf.py against the `gguf`
package's own dequantizers, and the scripts' refusal of bad arguments."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import pytest

SCRIPTS = Path(__file__).parents[2] / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_gguf = _load("bench_gguf")
cpu_vs = _load("cpu_vs_llama_server")


@pytest.mark.parametrize(("qtype", "levels"), [("Q4_K", 15), ("Q6_K", 62)])
def test_k_quant_blocks_dequantize_to_the_weights_within_a_step(qtype: str, levels: int) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 512), dtype=np.float32) * 0.02
    weights[0, :256] = 0.0  # an all-zero block
    weights[1] = np.abs(weights[1])  # blocks with no negative value
    weights[2, :32] *= 50  # one group far wider than the rest of its block
    kind = gguf.GGMLQuantizationType[qtype]
    blocks = bench_gguf.quantize(weights, kind)
    assert blocks.dtype == np.uint8 and blocks.shape == (8, 2 * gguf.GGML_QUANT_SIZES[kind][1])
    back = gguf.quants.dequantize(blocks, kind)
    assert back.shape == weights.shape
    assert np.all(back[0, :256] == 0.0)
    # every value within about one step of its block's range (scales themselves are rounded)
    for row in range(8):
        for block in range(2):
            sl = slice(256 * block, 256 * (block + 1))
            span = weights[row, sl].max() - min(weights[row, sl].min(), 0.0)
            assert np.abs(back[row, sl] - weights[row, sl]).max() <= 1.5 * span / levels + 1e-6
    assert np.linalg.norm(back - weights) / np.linalg.norm(weights) < 0.1


def test_k_quants_refuse_rows_that_are_not_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        bench_gguf.quantize(np.zeros((2, 576), dtype=np.float32), gguf.GGMLQuantizationType.Q4_K)


def test_q4_k_m_gives_more_bits_to_llama_cpp_s_layers() -> None:
    assert [i for i in range(16) if bench_gguf.more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


@pytest.mark.parametrize("argv", [
    ["default", "--quant", "Q4_K_M", "--out", "x.gguf"],
    ["random-llama", "--quant", "Q4_1", "--out", "x.gguf"],
    ["random-llama", "--quant", "Q8_0", "--out", "x.gguf", "--layers", "0"],
    ["other", "--quant", "Q8_0", "--out", "x.gguf"],
])
def test_bench_gguf_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_gguf.main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("argv", [
    ["--quant", "Q4_K_M"],
    ["--model", "random-llama", "--quant", "Q4_1"],
    ["--workload", "cpu1", "nope"],
    ["--num-requests", "0"],
    ["--threads", "0"],
    ["--port", "70000"],
])
def test_comparison_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cpu_vs.parse_args(argv)
    assert exc.value.code == 2


def test_comparison_defaults_to_the_shipped_quantization() -> None:
    assert cpu_vs.parse_args([]).quant == "Q4_1"
    assert cpu_vs.parse_args(["--model", "random-llama"]).quant == "Q4_K_M"


@pytest.mark.parametrize("argv", [["--version", "1.2"], ["--jobs", "0"], ["--bogus"], ["--version"]])
def test_build_script_refuses_bad_arguments(argv: list[str], tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(SCRIPTS / "build_llama_server.sh"), *argv, "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert not any(tmp_path.iterdir())  # nothing downloaded or built


def test_build_script_only_prints_a_binary_already_built(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server-9.9.9" / "build" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    done = subprocess.run(["bash", str(SCRIPTS / "build_llama_server.sh"), "--version", "9.9.9",
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(binary)


def test_resident_memory_counts_child_processes() -> None:
    code = "import sys, time; b = b'x' * (200 << 20); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child_rss, child_pss = cpu_vs.tree_memory_mib(child.pid)
        assert child_rss >= 200 and child_pss >= 200
        ours_rss, ours_pss = cpu_vs.tree_memory_mib(os.getpid())
        assert ours_rss >= child_rss + 10 and ours_pss >= child_pss + 10  # ours plus the child's
    finally:
        child.kill()
        child.communicate()


def test_random_llama_is_written_tensor_by_tensor_and_reads_back(tmp_path: Path) -> None:
    """The streamed writer's file: each tensor where its header says, in its mix's type, with
    the std the writer draws; the 8B shape is the size of Llama-3-8B's Q4_K_M file."""
    shape = bench_gguf.LlamaShape(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=300, tied=False)
    out = tmp_path / "tiny.gguf"
    bench_gguf.write_random_llama(out, "Q4_K_M", shape)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert len(tensors) == 3 + 9 * 2
    qt = gguf.GGMLQuantizationType
    assert tensors["token_embd.weight"].tensor_type == qt.Q4_K and tensors["output.weight"].tensor_type == qt.Q6_K
    assert tensors["blk.0.attn_v.weight"].tensor_type == qt.Q4_K and tensors["blk.1.attn_v.weight"].tensor_type == qt.Q6_K
    for name in ("blk.1.ffn_down.weight", "output.weight"):
        values = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
        assert 0.018 < float(np.std(values)) < 0.022, name
    assert np.all(np.asarray(tensors["output_norm.weight"].data) == 1.0)
    eight_b = bench_gguf._random_tensors(bench_gguf.SHAPES["8b"], 128256, "Q4_K_M")
    sizes = {kind: gguf.GGML_QUANT_SIZES[qt[kind]] for kind in ("Q4_K", "Q6_K")}
    total = sum(rows * cols // sizes[kind][0] * sizes[kind][1] for _, rows, cols, kind in eight_b if kind != "ones")
    assert 4.85e9 < total < 4.95e9
