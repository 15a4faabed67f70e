"""Loading HF directories: single file, sharded with and without index, PyTorch .bin, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models import get_model_class, load_hf_config, load_model, resolve_model, supported_architectures
from engine.models.loader import load_torch_bin, safetensors_files, torch_bin_files
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


def _save_bin_checkpoint(path: Path, model: torch.nn.Module, max_shard_size: str | None = None) -> None:
    """`model` as transformers' PyTorch-format `save_pretrained` wrote it (before safetensors
    became its only format): `pytorch_model.bin`, or shards with `pytorch_model.bin.index.json`."""
    from huggingface_hub import split_torch_state_dict_into_shards

    model.config.save_pretrained(str(path))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    if max_shard_size is None:
        torch.save(state, path / "pytorch_model.bin")
        return
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: state[n] for n in names}, path / filename)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@torch.inference_mode()
@pytest.mark.parametrize("max_shard_size", [None, "100KB"])
def test_pytorch_bin_checkpoint_loads_like_safetensors(tmp_path: Path, max_shard_size: str | None) -> None:
    hf = save_tiny_model(str(tmp_path / "st"), tiny_config("qwen2"))  # tied head: lm_head absent
    _save_bin_checkpoint(tmp_path / "bin", hf, max_shard_size)
    assert not any(n.endswith(".safetensors") for n in os.listdir(tmp_path / "bin"))
    assert (len(torch_bin_files(str(tmp_path / "bin"))) > 2) == (max_shard_size is not None)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = _logits(tmp_path / "st", prompt)
    assert torch.equal(_logits(tmp_path / "bin", prompt), expected)


@torch.inference_mode()
def test_safetensors_are_preferred_over_bin(tmp_path: Path) -> None:
    hf = save_tiny_model(str(tmp_path), tiny_config("llama"))
    torch.save({"model.embed_tokens.weight": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # never read
    prompt = [1, 2, 3]
    assert rel_err(_logits(tmp_path, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


class _Payload:
    """A pickled object that is not a tensor: unpickling it would run code of the file's choosing."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


def test_bin_holding_a_pickled_object_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = save_tiny_model(str(tmp_path / "st"), tiny_config("llama"))
    _save_bin_checkpoint(tmp_path / "bin", hf)
    state = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    state["extra"] = _Payload()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_model(str(tmp_path / "bin"), torch.float32, "cpu")
    assert "pickled code ran" not in capsys.readouterr().out


def test_bin_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path / "st"), tiny_config("llama"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save([torch.zeros(2)], tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a state dict"):
        load_model(str(tmp_path / "bin"), torch.float32, "cpu")


def test_directory_without_weights_names_both_formats(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors nor pytorch_model.bin"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_bin_in_the_pre_zip_format_loads(tmp_path: Path) -> None:
    """Files torch wrote before its zip format cannot be memory-mapped: they are read whole."""
    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(6.0).view(2, 3)}, file, _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match="mmap"):
        torch.load(file, weights_only=True, mmap=True)
    assert torch.equal(load_torch_bin(str(file))["w"], torch.arange(6.0).view(2, 3))
