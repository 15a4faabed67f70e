"""Rotary position embedding (neox / `rotate_half` layout) with rope scaling.

Supported `rope_type`s: `default`, `linear` (positions divided by `factor`, i.e. inverse
frequencies divided by it), `llama3` (low frequencies divided by `factor`, a smooth
blend between `low_freq_factor` and `high_freq_factor` wavelengths) and `yarn` (frequencies
that turn fewer than `beta_slow` times over the original context are divided by `factor`,
those turning more than `beta_fast` times are kept, a linear ramp between; cos and sin are
multiplied by an attention factor, `yarn_attention_factor`).

Parameters are read with `rope_parameters_from_config`: transformers 5 keeps them in
`config.rope_parameters` (with `rope_theta` inside), older versions in `config.rope_scaling`
plus `config.rope_theta`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.layers.backend import use_triton
from engine.worker.forward_context import current_forward_context

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, rotary_dim, params, max_position)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `factor` times: 1 + 0.1 m ln(factor)."""
    return 1.0 if factor <= 1 else 1.0 + 0.1 * mscale * math.log(factor)


def _yarn_factor(params: dict[str, Any], max_position: int) -> float:
    factor = params.get("factor")
    if factor is None:  # some configs give the stretch only as the ratio of the two context lengths
        return max_position / float(params["original_max_position_embeddings"])
    return float(factor)


def yarn_attention_factor(params: dict[str, Any], max_position: int) -> float:
    """What YaRN multiplies cos and sin by (so q . k of the rotated part by its square):
    `attention_factor` when given; else mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when the config has both (DeepSeek), else mscale(factor). 1 for the other rope types."""
    if params["rope_type"] != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = _yarn_factor(params, max_position)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
    return yarn_mscale(factor)


def _yarn_inv_freq(
    inv_freq: torch.Tensor, rotary_dim: int, params: dict[str, Any], max_position: int
) -> torch.Tensor:
    factor = _yarn_factor(params, max_position)
    base = float(params["rope_theta"])
    original = float(params["original_max_position_embeddings"])
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:
        # the (pair) dimension whose wavelength fits `rotations` times into the original context
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0: fast dims, kept (extrapolated); ramp 1: slow dims, interpolated (divided by factor)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, rotary_dim] = [x1 | x2]; cos = [c | c], sin = [-s | s]: [T, 1, rotary_dim]
    # -> [x1 c - x2 s | x2 c + x1 s]: transformers' q * cos + rotate_half(q) * sin with the same
    # roundings (x2 * -s is -(x2 * s) exactly), so 16-bit results match it (and the Triton
    # kernel) bit for bit; four ops for any number of heads.
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2 | x1]
    return x * cos + swapped * sin


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q [T, H * D] and k [T, KV * D] at the given positions [T]."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.params = params
        self.inv_freq = compute_inv_freq(rotary_dim, params, max_position)  # [rotary_dim // 2]
        self.attention_factor = yarn_attention_factor(params, max_position)  # folded into cos and sin
        self.cos_cache, self.sin_cache = self._build_cache(max_position)

    def _build_cache(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [num_positions, rotary_dim // 2] float32, computed as pos * inv_freq like the reference.
        freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), self.inv_freq)
        if self.attention_factor == 1.0:
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

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
        cos = self.cos_cache[positions].to(dtype)
        sin = self.sin_cache[positions].to(dtype)
        # Full rotary width, the sign of rotate_half folded into sin: [T, 1, rotary_dim].
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)

    def cos_sin_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, rotary_dim] float32 at `positions` [T], full width with the sign of
        rotate_half folded into sin: x rotates to x * cos + [x2 | x1] * sin (a fused kernel's)."""
        cos, sin = self._cos_sin(positions, torch.float32)  # [T, 1, rotary_dim]
        return cos.squeeze(1), sin.squeeze(1)

    def _rotate_heads(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_size] -> rotated copy, same shape
        cos, sin = self._cos_sin(positions, x.dtype)
        rd = self.rotary_dim
        if rd == self.head_size:
            return _rotate(x, cos, sin)
        # partial rotary: only the first rotary_dim dims of each head rotate
        return torch.cat((_rotate(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)

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
        q = self._rotate_heads(positions, q.view(num_tokens, -1, self.head_size))
        k = self._rotate_heads(positions, k.view(num_tokens, -1, self.head_size))
        return q.view(num_tokens, -1), k.view(num_tokens, -1)

    def forward_packed(
        self, positions: torch.Tensor, qk: torch.Tensor, q_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k side by side, qk: [T, q_size + k_size] (e.g. the leading columns of a fused
        qkv projection) -> rotated (q [T, q_size], k [T, k_size]).

        Same result as `forward(positions, qk[:, :q_size], qk[:, q_size:])`; on the torch path
        both rotate in one pass over [T, heads_q + heads_k, head_size].
        """
        if use_triton() and qk.is_cuda:
            return self.forward(positions, qk[:, :q_size], qk[:, q_size:])
        num_tokens = positions.shape[0]
        rotated = self._rotate_heads(positions, qk.view(num_tokens, -1, self.head_size)).view(num_tokens, -1)
        return rotated[:, :q_size], rotated[:, q_size:]

    def extra_repr(self) -> str:
        return (
            f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, rope_type={self.params['rope_type']}"
        )


def interleaved_to_half_rows(weight: torch.Tensor, num_heads: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Rows of a q or k projection (weight [H * D, in] or bias [H * D]) reordered from the
    interleaved rotary layout to the `rotate_half` one this module computes.

    Checkpoints of some families (Cohere, ChatGLM / GLM, and every llama.cpp conversion of
    Llama) rotate the pairs (x0, x1), (x2, x3), ... of each head's first `rotary_dim` dims;
    `rotate_half` rotates (x_i, x_{i + rotary_dim / 2}). Moving row 2i to i and 2i + 1 to
    rotary_dim / 2 + i in both q and k leaves every q . k product, so the attention, unchanged,
    and lets one rotary kernel serve both layouts. Rows past `rotary_dim` keep their place.
    """
    shape = weight.shape
    head_dim = shape[0] // num_heads
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    w = weight.reshape(num_heads, head_dim, *shape[1:])
    rot = w[:, :rotary_dim].reshape(num_heads, rotary_dim // 2, 2, *shape[1:]).transpose(1, 2)
    rot = rot.reshape(num_heads, rotary_dim, *shape[1:])
    return torch.cat((rot, w[:, rotary_dim:]), dim=1).reshape(shape)


def get_rope(config: Any, head_size: int) -> RotaryEmbedding:
    """The rotary embedding a transformers config asks for."""
    params = rope_parameters_from_config(config)
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    rotary_dim = int(head_size * partial)
    max_position = int(getattr(config, "max_position_embeddings", 4096) or 4096)
    return RotaryEmbedding(head_size, rotary_dim, max_position, params)
