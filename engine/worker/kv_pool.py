"""A worker's KV pool: the memory it may take, and its tensors.

`KVLayout` is what one token of the pool holds on this rank: K and V of every layer for the
rank's KV heads (and, for int8, a scale per token and head), or for multi-head latent attention
one latent per layer, the same on every rank (`KVLayout.for_model`). `kv_budget_bytes` is the memory the
pool may take on this rank: `kv_cache_memory_gb` when set; on CUDA a fraction
(`gpu_memory_utilization`) of the memory that stays free beside the weights, the largest step's
activations (measured by one profiling pass, `profile_activations`; for a vision-language model
the step also embeds the heaviest images the router lets one step embed, whose tower activations
and embeddings count) and the prefill graphs' own pool; else 1 GiB. The model runner divides it by the bytes per token, takes the smallest count
over the ranks (one slot index means the same token everywhere) and allocates the pool with
`allocate_kv_pool`, one dummy slot at its end for padded entries to point at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.config import EngineConfig
from engine.distributed import num_local_kv_heads
from engine.model_config import ModelConfig
from engine.models.causal_lm import CausalLM
from engine.multimodal import ImageInput, PromptImage, image_processor_for
from engine.sampling_params import SamplingParams
from engine.worker.forward_context import (
    INT8_KV_SCALE_DTYPE,
    KVPool,
    build_forward_context,
    set_forward_context,
)
from engine.worker.grammar_masks import StepMask
from engine.worker.image_inputs import ImageInputs
from engine.worker.sampler import SEARCH_MIN_ROWS, Sampler
from engine.worker.sampling_state import SamplingState

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_PROFILE_PARAMS = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)  # the costliest sampling path


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype, has_v: bool = True
) -> int:
    """Bytes one token occupies in the pool: K (and V, unless `has_v` is False) of every layer,
    plus their scales for int8."""
    tensors = 2 if has_v else 1
    per_layer = tensors * num_kv_heads * head_dim * kv_dtype.itemsize
    if kv_dtype == torch.int8:
        per_layer += tensors * num_kv_heads * INT8_KV_SCALE_DTYPE.itemsize  # one scale per (token, kv head)
    return num_layers * per_layer


def allocate_kv_pool(
    num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
    has_v: bool = True,
) -> KVPool:
    """Zeroed K (and V) tensors of `num_slots` + 1 slots per layer; without V, `v` is empty."""
    # One extra slot at the end: the dummy that padded entries point at.
    shape = (num_slots + 1, num_kv_heads, head_dim)
    num_v = num_layers if has_v else 0
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_v)]
    if dtype != torch.int8:
        return KVPool(k=k, v=v)
    scale_shape = (num_slots + 1, num_kv_heads)
    k_scale = [torch.ones(scale_shape, dtype=INT8_KV_SCALE_DTYPE, device=device) for _ in range(num_layers)]
    v_scale = [torch.ones(scale_shape, dtype=INT8_KV_SCALE_DTYPE, device=device) for _ in range(num_v)]
    return KVPool(k=k, v=v, k_scale=k_scale, v_scale=v_scale if has_v else None)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What one token of this rank's pool holds.

    Per-head attention: K and V of `num_kv_heads` heads of `head_dim` per layer. Multi-head
    latent attention (`has_v` False): one "head" per layer, the latent and the rotary key side
    by side (`head_dim` = kv_lora_rank + qk_rope_head_dim), which the attention reads as both its
    keys and (the latent part) its values; every rank holds all of it.
    """

    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    dtype: torch.dtype  # of the pool: the model's, another float dtype, or int8
    has_v: bool = True

    @classmethod
    def for_model(cls, shape: ModelConfig, tp_size: int, dtype: torch.dtype) -> KVLayout:
        """The layout of one rank's pool for a model of this shape over `tp_size` ranks."""
        if shape.kv_latent_dim is not None:  # the latent is replicated, not split by heads
            return cls(shape.num_layers, 1, shape.kv_latent_dim, dtype, has_v=False)
        return cls(shape.num_layers, num_local_kv_heads(shape.num_kv_heads, tp_size), shape.head_dim, dtype)

    def bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Of this pool, or of the same layout in `dtype`."""
        return kv_bytes_per_token(
            self.num_layers, self.num_kv_heads, self.head_dim, dtype or self.dtype, self.has_v
        )

    def allocate(self, num_slots: int, device: str) -> KVPool:
        return allocate_kv_pool(
            num_slots, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, device, self.has_v
        )


def kv_budget_bytes(
    config: EngineConfig, layout: KVLayout, model: CausalLM, sampler: Sampler, prefill_graph_tokens: int,
    profile_images: Callable[[], Sequence[ImageInput]] = tuple,
) -> int:
    """The bytes this rank's pool may take (see the module's docstring). On CUDA, once the
    weights are loaded: it runs the largest step to measure its activations, and for a
    vision-language model that step again with `profile_images()`."""
    if config.kv_cache_memory_gb is not None:
        return int(config.kv_cache_memory_gb * _GIB)
    if not config.resolved_device().startswith("cuda"):
        return _GIB  # CPU default: 1 GiB
    text_peak_bytes = activation_peak_bytes = profile_activations(config, layout, model, sampler)
    images = profile_images()
    if images:  # a vision-language model: the step again, embedding the heaviest images a step may
        activation_peak_bytes = max(text_peak_bytes, profile_activations(config, layout, model, sampler, images))
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    # The prefill graphs keep a pool of their own for their largest bucket's activations,
    # which grow about linearly with the tokens of a step (a graphed step has no images).
    profiled = config.max_num_batched_tokens or 8192
    graph_reserve = text_peak_bytes * prefill_graph_tokens // profiled
    budget = int((free - activation_peak_bytes - graph_reserve) * config.gpu_memory_utilization)
    logger.info(
        "GPU memory: %.2f GiB free after the weights, %.2f GiB peak activations, %.2f GiB for prefill graphs, "
        "%.0f%% of the rest for KV",
        free / _GIB, activation_peak_bytes / _GIB, graph_reserve / _GIB, 100 * config.gpu_memory_utilization,
    )
    return budget


def profile_images_of(model_path: str | None, hf_config: Any, max_tokens: int | None) -> list[ImageInput]:
    """A vision-language model's images for the profile: the heaviest a step may embed under the
    router's bound (`ImageProcessor.profile_images`); none for a model of text only."""
    processor = image_processor_for(model_path, hf_config, None) if model_path is not None else None
    if processor is None or max_tokens is None:
        return []
    return processor.profile_images(max_tokens)


class PeakMemory(Protocol):
    """Measures the peak memory of what runs between `start` and `peak`, beyond what was held at `start`."""

    def start(self) -> None: ...

    def peak(self) -> int: ...


class CudaPeakMemory:
    """The CUDA caching allocator's peak."""

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


@torch.inference_mode()
def profile_activations(
    config: EngineConfig, layout: KVLayout, model: CausalLM, sampler: Sampler, images: Sequence[ImageInput] = (),
    meter: PeakMemory | None = None,
) -> int:
    """Peak memory (CUDA's, unless `meter` measures) of the largest step the scheduler can plan,
    beyond the weights.

    A prefill of max_num_batched_tokens tokens (cut into sequences of at most
    max_model_len) over a temporary pool of its own, and logits for max_num_seqs rows sampled
    the costliest way (top-k, top-p and a grammar mask, which copies the logits). With `images`
    (a vision-language model: `ImageProcessor.profile_images`), the step first embeds them all in
    one go, as a step embeds its new images, and its leading tokens are their placeholders, with
    every embedding held through the forward pass (as a row holds an image's until it is computed),
    beside the bytes of the worker's recent embeddings at their bound (`max_image_tokens_per_step`).
    """
    assert config.max_model_len is not None and config.max_num_seqs is not None
    device = config.resolved_device()
    max_model_len = config.max_model_len
    num_tokens = config.max_num_batched_tokens or 8192
    lens = [min(max_model_len, num_tokens - i) for i in range(0, num_tokens, max_model_len)]
    kv = layout.allocate(num_tokens, device)
    req_to_token = torch.full((len(lens), max_model_len), kv.dummy_slot, dtype=torch.int32, device=device)
    offsets = [sum(lens[:i]) for i in range(len(lens))]
    for row, (offset, n) in enumerate(zip(offsets, lens, strict=True)):
        req_to_token[row, :n] = torch.arange(offset, offset + n, dtype=torch.int32)
    meter = meter if meter is not None else CudaPeakMemory()
    meter.start()
    ctx = build_forward_context(
        kv, req_to_token, list(range(len(lens))), [0] * len(lens), lens, torch.arange(num_tokens)
    )
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    held, image_args = _embed_images(model, images, num_tokens, device, config.max_image_tokens_per_step or 0)
    if image_args and getattr(model, "mrope", False):  # a step with image tokens: M-RoPE's [3, T] positions
        ctx.positions = ctx.positions.expand(3, -1).contiguous()
    with set_forward_context(ctx):
        hidden = model(input_ids, ctx.positions, *image_args)
    rows = min(config.max_num_seqs, num_tokens)
    logits = model.compute_logits(hidden[:rows])
    # Every row constrained (a grammar mask that allows everything): the processed logits' copy
    mask = StepMask(
        torch.full((rows, (logits.shape[1] + 31) // 32), -1, dtype=torch.int32, device=device),
        torch.arange(rows, device=device),
    )
    sampler.sample(logits, [SamplingState(_PROFILE_PARAMS, [])] * rows, mask)
    if rows >= SEARCH_MIN_ROWS:  # fewer rows sort the vocabulary for top-k / top-p: more memory a row
        sorted_rows = SEARCH_MIN_ROWS - 1
        sampler.sample(logits[:sorted_rows], [SamplingState(_PROFILE_PARAMS, [])] * sorted_rows)
    peak = meter.peak()
    del kv, req_to_token, ctx, hidden, logits, held, image_args
    return peak


def _embed_images(
    model: CausalLM, images: Sequence[ImageInput], num_tokens: int, device: str, recent_tokens: int
) -> tuple[list[torch.Tensor], tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
    """The profile's images embedded -> (their embeddings and, beside them, as many bytes as the
    worker's recent embeddings may hold (`ImageInputs.recent`, of `recent_tokens` tokens); the
    forward pass's `image_embeds` argument for the first `num_tokens` of their rows: () without images)."""
    if not images:
        return [], ()
    placed = [PromptImage(0, i.num_tokens, i.pixel_values, i.image_size, i.grid_thw) for i in images]
    held = ImageInputs(model, device).embed(placed)
    held.append(torch.empty(recent_tokens, held[0].shape[-1], dtype=held[0].dtype, device=device))
    rows, left = [], num_tokens
    for embeds in held:
        if left == 0:
            break
        rows.append(embeds[:left])
        left -= rows[-1].shape[0]
    index = torch.arange(num_tokens - left, device=device)
    return held, ((index, torch.cat(rows)),)
