"""Rotary position embedding (neox / `rotate_half` layout) with rope scaling.

Supported `rope_type`s: `default`, `linear` (positions divided by `factor`, i.e. inverse
frequencies divided by it) and `llama3` (low frequencies divided by `factor`, a smooth
blend between `low_freq_factor` and `high_freq_factor` wavelengths).

Parameters are read with `rope_parameters_from_config`: transformers 5 keeps them in
`config.rope_parameters` (with `rope_theta` inside), older versions in `config.rope_scaling`
plus `config.rope_theta`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.forward_context import current_forward_context
from engine.layers.backend import use_triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters_from_config(config: Any) -> dict[str, Any]:
    """A flat dict with at least `rope_type` and `rope_theta`."""
    params: dict[str, Any] = {}
    rope_parameters = getattr(config, "rope_parameters", None)
    rope_scaling = getattr(config, "rope_scaling", None)
    if isinstance(rope_parameters, dict) and rope_parameters:
        params.update(rope_parameters)
    elif isinstance(rope_scaling, dict) and rope_scaling:
        params.update(rope_scaling)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def compute_inv_freq(rotary_dim: int, params: dict[str, Any], max_position: int) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] float32."""
    base = float(params["rope_theta"])
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = float(params.get("original_max_position_embeddings") or max_position)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed down by `factor`; short ones are kept.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, rotary_dim]; cos/sin: [T, 1, rotary_dim // 2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q [T, H * D] and k [T, KV * D] at the given positions [T]."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.params = params
        self.inv_freq = compute_inv_freq(rotary_dim, params, max_position)  # [rotary_dim // 2]
        self.cos_cache, self.sin_cache = self._build_cache(max_position)

    def _build_cache(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [num_positions, rotary_dim // 2] float32, computed as pos * inv_freq like the reference.
        freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), self.inv_freq)
        return freqs.cos(), freqs.sin()

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Every layer rotates at the same positions: look them up once per step.
        ctx = current_forward_context()
        if ctx is None or ctx.positions is not positions:
            return self._lookup(positions, dtype)
        key = ("rope", id(self), dtype)
        cached = ctx.derived.get(key)
        if cached is None:
            cached = ctx.derived[key] = self._lookup(positions, dtype)
        return cached  # type: ignore[return-value]

    def _lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # The cache covers max_position_embeddings. Growing it past that needs positions.max()
        # on the host, so it is only checked on CPU (on GPU it would sync every layer).
        if positions.device.type == "cpu" and positions.numel():
            max_pos = int(positions.max())
            if max_pos >= self.cos_cache.shape[0]:
                self.cos_cache, self.sin_cache = self._build_cache(2 * max_pos + 1)
        if self.cos_cache.device != positions.device:
            self.cos_cache = self.cos_cache.to(positions.device)
            self.sin_cache = self.sin_cache.to(positions.device)
        cos = self.cos_cache[positions].unsqueeze(1).to(dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(dtype)
        return cos, sin  # [T, 1, rotary_dim // 2]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if use_triton() and q.is_cuda:
            from engine.kernels.rotary import apply_rotary

            if self.cos_cache.device != q.device:
                self.cos_cache, self.sin_cache = self.cos_cache.to(q.device), self.sin_cache.to(q.device)
            apply_rotary(q, k, positions, self.cos_cache, self.sin_cache, self.head_size, self.rotary_dim)
            return q, k  # rotated in place
        num_tokens = positions.shape[0]
        cos, sin = self._cos_sin(positions, q.dtype)
        q = q.view(num_tokens, -1, self.head_size)
        k = k.view(num_tokens, -1, self.head_size)
        rd = self.rotary_dim
        if rd == self.head_size:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        else:  # partial rotary: only the first rotary_dim dims of each head rotate
            q = torch.cat((_rotate(q[..., :rd], cos, sin), q[..., rd:]), dim=-1)
            k = torch.cat((_rotate(k[..., :rd], cos, sin), k[..., rd:]), dim=-1)
        return q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)

    def extra_repr(self) -> str:
        return (
            f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, rope_type={self.params['rope_type']}"
        )


def get_rope(config: Any, head_size: int) -> RotaryEmbedding:
    """The rotary embedding a transformers config asks for."""
    params = rope_parameters_from_config(config)
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    rotary_dim = int(head_size * partial)
    max_position = int(getattr(config, "max_position_embeddings", 4096) or 4096)
    return RotaryEmbedding(head_size, rotary_dim, max_position, params)
