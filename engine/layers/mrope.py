"""Multimodal rotary positions (M-RoPE, Qwen2-VL / Qwen2.5-VL's language model).

A token has three positions, temporal, height and width; the rotary frequencies of a head are
cut into three sections (`mrope_section`, in pairs of dims, summing to rotary_dim / 2), and
section i turns at position i. A text token's three positions are equal, which makes M-RoPE
the plain rotary embedding over the whole head; only the tokens of an image differ (their
height and width positions run over the image's grid).

So `positions` is what the model runner passes: [T] when every token of the step has three
equal positions (every text and decode step, also after an image, whose positions are shifted
by the row's offset), taking `RotaryEmbedding`'s own paths (the Triton kernel on CUDA, CUDA
graphs), and [3, T] for a step with image tokens, rotated in torch on every device (such steps
run eagerly).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.layers.rotary import RotaryEmbedding, rope_parameters_from_config

_DEFAULT_SECTION = [16, 24, 24]  # (head_dim 128)


class MRotaryEmbedding(RotaryEmbedding):
    """`RotaryEmbedding` that also takes positions [3, T] (temporal, height, width)."""

    def __init__(
        self, head_size: int, rotary_dim: int, max_position: int, params: dict[str, Any], mrope_section: list[int]
    ) -> None:
        super().__init__(head_size, rotary_dim, max_position, params)
        if sum(mrope_section) != rotary_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to rotary_dim / 2 = {rotary_dim // 2}")
        self.mrope_section = list(mrope_section)
        # [rotary_dim // 2]: which of the three positions turns each frequency
        self._axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)])

    def _lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super()._lookup(positions, dtype)
        # positions [3, T]: cos / sin of each axis [3, T, rotary_dim // 2], each frequency from its axis
        cos, sin = super()._lookup(positions.reshape(-1), dtype)  # [3T, 1, rotary_dim], halves repeated
        half = self.rotary_dim // 2
        if self._axis.device != positions.device:
            self._axis = self._axis.to(positions.device)  # once
        axis = self._axis.view(1, 1, -1).expand(1, positions.shape[1], -1)
        pick = lambda t: t[:, 0, half:].reshape(3, -1, half).gather(0, axis)[0]  # noqa: E731  [T, half]
        cos_h, sin_h = pick(cos), pick(sin)  # (sin's second half is +sin)
        return torch.cat((cos_h, cos_h), dim=-1).unsqueeze(1), torch.cat((-sin_h, sin_h), dim=-1).unsqueeze(1)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        num_tokens = positions.shape[1]
        q = self._rotate_heads(positions, q.reshape(num_tokens, -1, self.head_size))
        k = self._rotate_heads(positions, k.reshape(num_tokens, -1, self.head_size))
        return q.view(num_tokens, -1), k.view(num_tokens, -1)

    def forward_packed(
        self, positions: torch.Tensor, qk: torch.Tensor, q_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward_packed(positions, qk, q_size)
        num_tokens = positions.shape[1]
        rotated = self._rotate_heads(positions, qk.reshape(num_tokens, -1, self.head_size)).view(num_tokens, -1)
        return rotated[:, :q_size], rotated[:, q_size:]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mrope_section={self.mrope_section}"


def get_mrope(config: Any, head_size: int) -> MRotaryEmbedding:
    """The M-RoPE of a Qwen2-VL text config (`mrope_section` in its rope parameters, transformers'
    16 / 24 / 24 when absent; a rope type of "mrope", as older configs name it, is the default
    frequencies). The whole head rotates."""
    params = rope_parameters_from_config(config)
    section = params.get("mrope_section") or _DEFAULT_SECTION
    if params["rope_type"] == "mrope":
        params["rope_type"] = "default"
    max_position = int(getattr(config, "max_position_embeddings", 4096) or 4096)
    return MRotaryEmbedding(head_size, head_size, max_position, params, section)
