"""A decode step's decoder layers as one C++ op each (`engine.models.cpu_decode_layer`): the
same logits, KV pool and greedy tokens as the module path of the same GGUF model served in its
blocks, for Llama (GQA), Mistral (sliding window), Qwen2 (q/k/v biases) and a K-quant mix (a
fused q | k | v of two block types), one sequence and a batch of three of different lengths;
the op chosen per model at load, not per process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from torch import nn

from engine.kernels import gguf_cpu
from engine.layers import Attention, RMSNorm
from engine.models import load_model, resolve_model
from engine.models.llama import LlamaAttention, PreNormDecoderLayer
from engine.worker.forward_context import get_forward_context
from tests.engine.models.harness import Harness, save_tiny_model, tiny_config
from tests.engine.models.test_gguf import write_gguf
from tests.engine.models.test_gguf_quantized import Q6_K_PARTS, write_k_quant_llama

QT = gguf.GGMLQuantizationType
PROMPTS = [[5, 17, 42, 9, 100], [3, 77, 8, 61, 200, 14, 9, 33, 2], [11, 250, 7, 7, 90, 31, 4, 66, 18, 120, 5, 43, 1]]


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    assert gguf_cpu.available(), f"the CPU kernels did not build: {gguf_cpu.build_error()}"


def _tiny_gguf(kind: str, directory: Path) -> Path:
    """A 2-layer random model of `kind` as a GGUF file (Q8_0 blocks, or Q4_K with v and down in Q6_K)."""
    file = directory / f"{kind}.gguf"
    if kind == "llama-Q4_K_M":
        write_k_quant_llama(file, Q6_K_PARTS, default=QT.Q4_K)
        return file
    overrides: dict[str, Any] = {"num_hidden_layers": 2, "tie_word_embeddings": False}
    if kind == "llama":
        overrides.update(num_attention_heads=8, num_key_value_heads=2)  # 4 query heads per kv head
    hf = save_tiny_model(str(directory / kind), tiny_config(kind, **overrides))
    arch = "qwen2" if kind == "qwen2" else "llama"
    write_gguf(file, hf, QT.Q8_0, arch=arch, name=kind)
    return file


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "llama-Q4_K_M"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    directory = tmp_path_factory.mktemp(request.param)
    model = load_model(resolve_model(str(_tiny_gguf(request.param, directory)), str(directory / "cache")), torch.float32, "cpu")
    assert all(layer.fused_decode is not None for layer in model.model.layers)  # type: ignore[union-attr]
    return model


@contextmanager
def module_path(model: nn.Module) -> Iterator[None]:
    """Today's path: the layers' modules (with the C++ norm and attention ops), no fused op."""
    layers = [m for m in model.modules() if isinstance(m, PreNormDecoderLayer)]
    fused = [layer.fused_decode for layer in layers]
    for layer in layers:
        layer.fused_decode = None
    try:
        yield
    finally:
        for layer, f in zip(layers, fused, strict=True):
            layer.fused_decode = f


@contextmanager
def modules_refuse_decode(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a decode step that reaches a layer's attention module: the op must run it."""
    forward = LlamaAttention.forward

    def guarded(self: LlamaAttention, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        assert not get_forward_context().is_decode_only, "a decode step ran the attention module"
        return forward(self, positions, hidden)

    with monkeypatch.context() as patch:
        patch.setattr(LlamaAttention, "forward", guarded)
        yield


def _pool(harness: Harness) -> torch.Tensor:
    return torch.stack([torch.stack(harness.kv.k), torch.stack(harness.kv.v)])


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_steps_equal_the_module_path(served: nn.Module, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """24 greedy steps of `batch` sequences of different lengths (past Mistral's window of 6):
    the op's logits, KV pool and tokens equal the modules' exactly (the same arithmetic)."""
    fused, reference = Harness(served), Harness(served)
    prompts = [[t % 256 for t in p] for p in PROMPTS[:batch]]
    next_tokens = []
    with module_path(served):  # the prompts through the modules in both
        for row, prompt in enumerate(prompts):
            next_tokens.append(int(reference.prefill(row, prompt)[-1].argmax()))
            fused.prefill(row, prompt)
    for _ in range(24):
        steps = [(row, [token]) for row, token in enumerate(next_tokens)]
        with module_path(served):
            expected = reference.step(steps)
        with modules_refuse_decode(monkeypatch):
            actual = fused.step(steps)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)  # the same float32 arithmetic
        assert [int(a[-1].argmax()) for a in actual] == [int(e[-1].argmax()) for e in expected]
        next_tokens = [int(e[-1].argmax()) for e in expected]
    assert torch.equal(_pool(fused), _pool(reference))


@torch.inference_mode()
def test_greedy_generation_is_unchanged(served: nn.Module) -> None:
    prompt = [p % 256 for p in PROMPTS[1]]
    fused = Harness(served).generate(prompt, 24)
    with module_path(served):
        assert fused == Harness(served).generate(prompt, 24)


@torch.inference_mode()
def test_an_int8_pool_keeps_the_module_path(served: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The op reads float32 pools only: an int8 KV pool's decode steps run the modules."""
    calls = []
    forward = LlamaAttention.forward

    def counted(self: LlamaAttention, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        calls.append(get_forward_context().is_decode_only)
        return forward(self, positions, hidden)

    monkeypatch.setattr(LlamaAttention, "forward", counted)
    prompt = [p % 256 for p in PROMPTS[0]]
    fused = Harness(served, kv_dtype=torch.int8).generate(prompt, 4)
    assert calls.count(True) == 3 * len(served.model.layers)  # type: ignore[union-attr]
    with module_path(served):
        assert fused == Harness(served, kv_dtype=torch.int8).generate(prompt, 4)


def test_the_choice_is_per_model(tmp_path: Path, cache: Path) -> None:
    """A model served with GGUF blocks takes the C++ ops; a model loaded from safetensors in the
    same process (the library loaded) keeps torch's; a layer the op cannot compute (Qwen3's
    q/k norms) keeps its modules."""
    save_tiny_model(str(tmp_path / "hf"), tiny_config("llama", num_hidden_layers=1))
    dense = load_model(str(tmp_path / "hf"), torch.float32, "cpu")
    kernels = [m.cpu_kernels for m in dense.modules() if isinstance(m, (RMSNorm, Attention))]
    assert kernels and not any(kernels)
    assert all(layer.fused_decode is None for layer in dense.model.layers)  # type: ignore[union-attr]
    file = tmp_path / "qwen3.gguf"
    qwen3 = save_tiny_model(str(tmp_path / "qwen3"), tiny_config("qwen3", num_hidden_layers=1, tie_word_embeddings=False))
    write_gguf(file, qwen3, QT.Q8_0, arch="qwen3")
    served = load_model(resolve_model(str(file), str(cache)), torch.float32, "cpu")
    assert all(m.cpu_kernels for m in served.modules() if isinstance(m, (RMSNorm, Attention)))
    assert served.model.layers[0].fused_decode is None  # type: ignore[union-attr]
