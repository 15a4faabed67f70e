"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

A native-resolution vision transformer (engine/models/qwen2_vl_vision.py) turns each image's
patches into one row per `<|image_pad|>` placeholder (grid_t * grid_h * grid_w / merge_size^2 of
them); the worker computes them once per image (`embed_images`, engine/worker/image_inputs.py)
and passes the rows a step needs to `forward`, which puts them in place of the placeholders'
embeddings of the packed batch. The language model is Qwen2 (engine/models/llama.py) with
M-RoPE (engine/layers/mrope.py): `positions` [T], or [3, T] for a step with image tokens, come
from the worker (engine/worker/mrope_positions.py), which keeps each row's offsets.

Checkpoint names: transformers 5 saves `model.language_model.*`, `model.visual.*` and
`lm_head.*`; the published checkpoints name the decoder `model.*` and the tower `visual.*`.
`checkpoint_weights` maps both onto this module's `language_model.model.*`,
`language_model.lm_head.*` and `visual.*`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch

from engine.distributed.lazy_weight import WeightLike
from engine.layers.mrope import MRotaryEmbedding, get_mrope
from engine.models.causal_lm import CausalLM
from engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from engine.models.llava import forward_with_images
from engine.models.qwen2_vl_vision import Grid, Qwen2VisionTransformer


class _Qwen2MRope(Qwen2ForCausalLM):
    """Qwen2 whose rotary embedding takes M-RoPE positions."""

    @classmethod
    def rotary_of(cls, config: Any, head_dim: int) -> MRotaryEmbedding:
        return get_mrope(config, head_dim)


class Qwen2VLForConditionalGeneration(CausalLM):
    """The decoder is sharded over the tensor-parallel ranks as usual; the vision tower is
    replicated (every rank embeds every image)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    # Read by the worker: positions are M-RoPE's, images come as patches with their grid.
    mrope: ClassVar[bool] = True
    qwen2_5: ClassVar[bool] = False

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        self.language_model = _Qwen2MRope(config.text_config, tp_rank, tp_size)
        lm = self.language_model
        # transformers 5 keeps the tie on the outer config, older saves in text_config
        self.tie_word_embeddings = bool(
            getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False)
        )
        if self.tie_word_embeddings and not lm.tie_word_embeddings:
            lm.lm_head.tie_weights(lm.model.embed_tokens)
            lm.tie_word_embeddings = True
        self.visual = Qwen2VisionTransformer(config.vision_config, qwen2_5=self.qwen2_5)
        self.spatial_merge_size = self.visual.merge_size

    @torch.inference_mode()
    def embed_images(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """patches [N, C * P * P] of the images back to back, their (t, h, w) patch grids ->
        image embeddings [N / merge_size^2, hidden_size], image by image, one per placeholder."""
        return self.visual(patches, grids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """As `CausalLM.forward` with positions [T] or [3, T] (M-RoPE); `image_embeds` (packed
        indices [K], rows [K, hidden_size]) replace those tokens' embeddings."""
        return forward_with_images(self.language_model, input_ids, positions, image_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterator[tuple[str, WeightLike]]:
        for name, tensor in weights:
            name = _rename(name)
            if self.tie_word_embeddings and name.startswith("language_model.lm_head."):
                continue  # (some tied checkpoints still hold a copy)
            yield name, tensor


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):  # noqa: N801 (transformers' name)
    """Qwen2-VL with Qwen2.5-VL's tower: RMSNorms, SwiGLU MLPs, windowed attention."""

    qwen2_5: ClassVar[bool] = True


def _rename(name: str) -> str:
    """A checkpoint name of either layout above -> this module's."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model."):
        return "language_model." + name
    if name.startswith("lm_head."):
        return "language_model." + name
    return name
