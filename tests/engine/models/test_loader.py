"""Loading HF directories: single file, sharded with and without index, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models import get_model_class, load_hf_config, load_model, resolve_model, supported_architectures
from engine.models.loader import safetensors_files
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config


def _logits(path: Path, prompt: list[int]) -> torch.Tensor:
    return Harness(load_model(str(path), torch.float32, "cpu")).prefill(0, prompt)


@torch.inference_mode()
def test_sharded_checkpoint_with_index_loads(tmp_path: Path) -> None:
    hf = save_tiny_model(str(tmp_path), tiny_config("llama"), max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(safetensors_files(str(tmp_path))) > 2
    prompt = [5, 6, 7, 8, 9]
    assert rel_err(_logits(tmp_path, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


@torch.inference_mode()
def test_several_files_without_index_load(tmp_path: Path) -> None:
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("qwen2"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    out = tmp_path / "split"
    out.mkdir()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, str(out / "part-a.safetensors"))
    save_file({n: tensors[n] for n in names[1::2]}, str(out / "part-b.safetensors"))
    (out / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    prompt = [1, 2, 3]
    assert rel_err(_logits(out, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


def test_directory_without_tokenizer_loads(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("mistral"))
    assert not any("token" in name for name in os.listdir(tmp_path))
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    model = load_model(str(tmp_path), torch.float32, "cpu")
    assert Harness(model).prefill(0, [1, 2]).shape == (2, 256)


def test_bf16_load_casts_weights(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    model = load_model(str(tmp_path), torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = Harness(model, kv_dtype=torch.bfloat16).prefill(0, [1, 2, 3])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_missing_weight_is_an_error(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="gate_up_proj"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        get_model_class("GPT2LMHeadModel")
    assert "MistralForCausalLM" in supported_architectures()
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_hf_config(str(tmp_path)).architectures == ["FancyForCausalLM"]
    with pytest.raises(ValueError, match="unsupported model architecture 'FancyForCausalLM'"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_resolve_model_rejects_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="neither a GGUF"):
        resolve_model(str(tmp_path / "weights.bin"))
