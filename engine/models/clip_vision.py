"""CLIP's vision transformer, as vision-language models use it: image -> patch features.

pixels [N, 3, S, S] -> a convolution of stride `patch_size` (no bias) cuts (S / P)^2 patches
-> a learned class token in front -> learned position embeddings -> LayerNorm (CLIP's
"pre_layrnorm") -> encoder layers (pre-norm: LayerNorm, bidirectional multi-head attention with
biases, LayerNorm, MLP fc1 -> quick_gelu / gelu -> fc2). A vision-language model reads the hidden
states after some layer (`vision_feature_layer`: -2 is the output of the second-to-last layer),
so only the layers up to it are built; the final `post_layernorm` belongs to CLIP's pooled
output, which those models never read. Weights are replicated on every tensor-parallel rank:
the tower is small next to the language model and runs once per image.

Checkpoint names follow transformers (`embeddings.patch_embedding.weight`,
`encoder.layers.N.self_attn.q_proj.weight`, ...), below the owner's prefix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import Activation, LayerNorm, ReplicatedLinear


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, self.patch_size = int(config.hidden_size), int(config.patch_size)
        self.class_embedding = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.patch_embedding = nn.Conv2d(
            int(config.num_channels), hidden, kernel_size=self.patch_size, stride=self.patch_size, bias=False
        )
        num_positions = (int(config.image_size) // self.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, hidden)
        for param in self.parameters():
            param.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [N, 3, S, S] -> [N, 1 + (S / P)^2, hidden]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[: patches.shape[1] + 1]


class ClipAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads)
        self.q_proj = ReplicatedLinear(hidden, hidden, bias=True)
        self.k_proj = ReplicatedLinear(hidden, hidden, bias=True)
        self.v_proj = ReplicatedLinear(hidden, hidden, bias=True)
        self.out_proj = ReplicatedLinear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor, num_images: int) -> torch.Tensor:
        # x: [N * L, hidden], the images' tokens back to back; each image attends to itself only
        def heads(t: torch.Tensor) -> torch.Tensor:  # -> [N, heads, L, head_dim]
            return t.view(num_images, -1, self.num_heads, t.shape[-1] // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class ClipMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, inter = int(config.hidden_size), int(config.intermediate_size)
        self.fc1 = ReplicatedLinear(hidden, inter, bias=True)
        self.fc2 = ReplicatedLinear(inter, hidden, bias=True)
        self.act = Activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, eps = int(config.hidden_size), float(config.layer_norm_eps)
        self.layer_norm1 = LayerNorm(hidden, eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = LayerNorm(hidden, eps)
        self.mlp = ClipMLP(config)

    def forward(self, x: torch.Tensor, num_images: int) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), num_images)
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, config: Any, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(num_layers))


class ClipVisionTower(nn.Module):
    """The embeddings, the pre-LayerNorm and the first `num_layers` encoder layers."""

    def __init__(self, config: Any, num_layers: int) -> None:
        super().__init__()
        self.embeddings = ClipVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(int(config.hidden_size), float(config.layer_norm_eps))
        self.encoder = ClipEncoder(config, num_layers)

    def forward(self, pixel_values: torch.Tensor, feature_layers: list[int]) -> list[torch.Tensor]:
        """pixels [N, 3, S, S] -> the hidden states [N, L, hidden] at each of `feature_layers`
        (0: after the pre-LayerNorm, k: after encoder layer k)."""
        x = self.embeddings(pixel_values)
        num_images, length, hidden = x.shape
        x = self.pre_layrnorm(x.reshape(-1, hidden))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, num_images)
            states.append(x)
        return [states[k].view(num_images, length, hidden) for k in feature_layers]


def feature_layers(config: Any, feature_layer: int | list[int]) -> list[int]:
    """`vision_feature_layer` (an index into transformers' hidden states: 0 the embeddings,
    negative from the end) as non-negative layer counts."""
    total = int(config.num_hidden_layers) + 1
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    return [k % total for k in layers]
