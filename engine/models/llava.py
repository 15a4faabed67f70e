"""LLaVA 1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a projector, a Llama-family decoder;
LLaVA-NeXT (`LlavaNextForConditionalGeneration`): the same, reading each image as tiles.

An image becomes `image_embeds`: the vision tower's hidden states at `vision_feature_layer`
(without the class token under the "default" `vision_feature_select_strategy`), through the
projector (linear -> GELU -> linear) into the decoder's width, one row per placeholder token.
The worker computes them once per image (`embed_images`, engine/worker/image_inputs.py) and
passes the rows a step needs to `forward`, which puts them in place of the placeholder tokens'
embeddings of the packed batch; everything else is the decoder's own forward pass (Llama,
Mistral or Qwen2 wiring from engine/models/llama.py, by `text_config.model_type`).

LLaVA-NeXT reads an image at any resolution (engine/anyres.py): the image resized whole and a
grid of tiles of it go through the tower and projector as a batch; the grid's features are laid
out as one map, unpadded, and each of its rows ends with the learned `image_newline`.

Checkpoint names: transformers 5 saves `language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.*` and `multi_modal_projector.*` (in memory: `model.language_model.*`,
`model.vision_tower.*`, `lm_head.*`); the published LLaVA 1.5 checkpoints name the tower
`vision_tower.vision_model.*`; LLaVA-NeXT's `image_newline` is `model.image_newline` in memory
and `image_newline` saved. `checkpoint_weights` maps each onto this module's names and drops the
tower's layers past the feature layer and its `post_layernorm`, which the model never reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from engine.anyres import check_select_strategy, grid_pinpoints, grid_shape, unpadded_box
from engine.distributed.lazy_weight import WeightLike
from engine.layers import Activation, ReplicatedLinear
from engine.models.causal_lm import CausalLM
from engine.models.clip_vision import ClipVisionTower, feature_layers
from engine.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

# text_config.model_type -> the decoder's class
_DECODERS: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}
_WRAPPED = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")


def forward_with_images(
    lm: Any, input_ids: torch.Tensor, positions: torch.Tensor, image_embeds: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """The language model `lm`'s body over `input_ids`, with `image_embeds` (packed indices [K],
    rows [K, hidden_size]) in place of those tokens' embeddings (LLaVA's and Qwen2-VL's forward)."""
    inputs_embeds = None
    if image_embeds is not None:
        index, rows = image_embeds
        inputs_embeds = lm.model.embed_tokens(input_ids)
        inputs_embeds.index_copy_(0, index, rows.to(inputs_embeds.dtype))
    return lm.model(input_ids, positions, inputs_embeds)


class LlavaProjector(nn.Module):
    def __init__(self, config: Any, in_features: int, out_features: int) -> None:
        super().__init__()
        bias = bool(getattr(config, "multimodal_projector_bias", True))
        self.linear_1 = ReplicatedLinear(in_features, out_features, bias=bias)
        self.act = Activation(getattr(config, "projector_hidden_act", "gelu"))
        self.linear_2 = ReplicatedLinear(out_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(CausalLM):
    """The decoder is sharded over the tensor-parallel ranks as usual; the vision tower and
    the projector are replicated (every rank embeds every image)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        text, vision = config.text_config, config.vision_config
        decoder = _DECODERS.get(text.model_type)
        if decoder is None:
            raise ValueError(f"LLaVA with a {text.model_type!r} decoder is not supported; supported: {sorted(_DECODERS)}")
        self.language_model = decoder(text, tp_rank, tp_size)
        self.tie_word_embeddings = self.language_model.tie_word_embeddings
        self.feature_layers = feature_layers(vision, config.vision_feature_layer)
        self.drop_class_token = getattr(config, "vision_feature_select_strategy", "default") == "default"
        self.vision_tower = ClipVisionTower(vision, max(self.feature_layers))
        self.multi_modal_projector = LlavaProjector(
            config, int(vision.hidden_size) * len(self.feature_layers), int(text.hidden_size)
        )

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor, image_sizes: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """pixels [N, 3, S, S] -> image embeddings [N, tokens, hidden_size], one per placeholder
        (the tower's input is of one size: the images' own sizes do not matter)."""
        states = self.vision_tower(pixel_values, self.feature_layers)
        if self.drop_class_token:
            states = [s[:, 1:] for s in states]
        features = torch.cat(states, dim=-1)
        n, length, width = features.shape
        return self.multi_modal_projector(features.reshape(n * length, width)).view(n, length, -1)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """As `CausalLM.forward`; `image_embeds` (packed indices [K], rows [K, hidden_size]) replace
        those tokens' embeddings."""
        return forward_with_images(self.language_model, input_ids, positions, image_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterator[tuple[str, WeightLike]]:
        own = {name for name, _ in self.named_parameters()}
        for name, tensor in weights:
            name = _rename(name)
            if name.startswith("vision_tower.") and name not in own:
                continue  # layers past the feature layer, post_layernorm: never read
            yield name, tensor


def _rename(name: str) -> str:
    """A checkpoint name of any of the layouts above -> this module's."""
    if name.startswith(_WRAPPED):
        name = name[len("model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    if name.startswith("language_model.") and not name.startswith(("language_model.model.", "language_model.lm_head.")):
        return "language_model.model." + name[len("language_model."):]
    return name.replace("vision_tower.vision_model.", "vision_tower.", 1)


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT: each image as its base tile and a grid of tiles (engine/anyres.py)."""

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        check_select_strategy(config)
        super().__init__(config, tp_rank, tp_size)
        self.pinpoints = grid_pinpoints(config)
        self.tile_size = int(config.vision_config.image_size)
        self.tile_side = self.tile_size // int(config.vision_config.patch_size)  # features per tile side
        self.image_newline = nn.Parameter(torch.empty(int(config.text_config.hidden_size)), requires_grad=False)

    @torch.inference_mode()
    def embed_images(  # type: ignore[override]
        self, pixel_values: torch.Tensor, image_sizes: Sequence[tuple[int, int]] = ()
    ) -> list[torch.Tensor]:
        """pixels [N, tiles, 3, S, S] (each image's base tile, then its grid's row by row) and the
        images' (height, width) -> each image's embeddings [tokens, hidden_size]."""
        num_images, num_tiles = pixel_values.shape[:2]
        tiles = super().embed_images(pixel_values.flatten(0, 1))  # [N * tiles, side * side, hidden]
        tiles = tiles.unflatten(0, (num_images, num_tiles))
        return [self._arrange(t, size) for t, size in zip(tiles, image_sizes, strict=True)]

    def _arrange(self, tiles: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """One image's tile features [tiles, side * side, hidden] -> its embeddings: the base
        tile's, then the grid's as one map, unpadded, a newline after each row."""
        rows, cols = grid_shape(image_size, self.pinpoints, self.tile_size)
        if tiles.shape[0] != 1 + rows * cols:
            raise ValueError(f"an image of {image_size} comes as {tiles.shape[0]} tiles where its grid takes {1 + rows * cols}")
        side, hidden = self.tile_side, tiles.shape[-1]
        # [rows, cols, side, side, hidden] -> [rows, side, cols, side, hidden]: the map's rows in order
        grid = tiles[1:].view(rows, cols, side, side, hidden).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, hidden)
        top, height, left, width = unpadded_box(image_size, rows * side, cols * side)
        grid = grid[top : top + height, left : left + width]
        newline = self.image_newline.to(grid.dtype).expand(height, 1, hidden)
        return torch.cat([tiles[0], torch.cat([grid, newline], dim=1).reshape(-1, hidden)])
