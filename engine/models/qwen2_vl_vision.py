"""Qwen2-VL's and Qwen2.5-VL's native-resolution vision transformers: patches -> image tokens.

An image arrives as its patches, [num_patches, C * P * P] float32 (transformers' Qwen2-VL image
processor's, which repeats a still image over the temporal patch of 2: one frame of it, repeated
here; patches listed merge block by merge block: the 2 x 2 patches that become one token are
consecutive), with its patch grid (t, h, w). Data flow, every image of a batch packed back to back:

    patch embedding (a Conv3d of stride = kernel: one linear map of each flattened patch)
    -> blocks: pre-norm attention with a 2-D rotary (each head's first half turns at the patch's
       row, the second half at its column; frequencies of head_dim / 2), pre-norm MLP
    -> the merger: norm, the merge_size^2 patches of a token side by side, MLP into the
       language model's width: [num_patches / merge_size^2, hidden_size]

Qwen2-VL: LayerNorms, MLP fc1 -> quick_gelu -> fc2; every block attends over its whole image.
Qwen2.5-VL: RMSNorms, a SwiGLU MLP with biases; the blocks of `fullatt_block_indexes` attend over
the whole image, the others within windows of `window_size` pixels (the patches are reordered
window by window before the blocks, and the tokens put back in image order after the merger).

Weights are replicated on every tensor-parallel rank (as LLaVA's tower): names follow transformers
(`patch_embed.proj.weight`, `blocks.N.attn.qkv.weight`, `merger.mlp.0.weight`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import Activation, LayerNorm, ReplicatedLinear, RMSNorm
from engine.worker.transfer import to_device

Grid = tuple[int, int, int]  # (t, h, w) in patches


class _Segments:
    """Attention within segments of the packed patches (images, or windows): the segments of
    each length as one batch (no padding, no mask)."""

    def __init__(self, lengths: Sequence[int], device: torch.device) -> None:
        starts: dict[int, list[int]] = {}  # length -> the first patch of each segment of that length
        first = 0
        for n in lengths:
            starts.setdefault(n, []).append(first)
            first += n
        # [segments, length]: the patches of each segment, one tensor per length
        self.groups = [to_device(torch.tensor(s)[:, None] + torch.arange(n), torch.long, device) for n, s in starts.items()]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: [N, heads, head_dim] -> [N, heads * head_dim]
        if len(self.groups) == 1 and self.groups[0].shape[0] == 1:  # one segment: the whole batch
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            return out.transpose(0, 1).flatten(1)
        out = torch.empty_like(q)
        for index in self.groups:
            qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [segments, heads, length, head_dim]
            out[index] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        return out.flatten(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, head_dim] in float32; cos / sin: [N, 1, head_dim], halves repeated
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = ReplicatedLinear(dim, 3 * dim, bias=True)
        self.proj = ReplicatedLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: _Segments) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)  # [N, heads, head_dim] each
        cos, sin = rope
        q, k = _rotate(q.float(), cos, sin).to(x.dtype), _rotate(k.float(), cos, sin).to(x.dtype)
        return self.proj(segments.attend(q, k, v))


class VisionMLP(nn.Module):
    """fc1 -> activation -> fc2 (Qwen2-VL)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = ReplicatedLinear(dim, hidden, bias=True)
        self.act = Activation(act)
        self.fc2 = ReplicatedLinear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with biases (Qwen2.5-VL)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = ReplicatedLinear(dim, hidden, bias=True)
        self.up_proj = ReplicatedLinear(dim, hidden, bias=True)
        self.down_proj = ReplicatedLinear(hidden, dim, bias=True)
        self.act = Activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, rms_norm: bool) -> None:
        super().__init__()
        norm = (lambda: RMSNorm(dim, 1e-6)) if rms_norm else (lambda: LayerNorm(dim, 1e-6))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: _Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """norm -> merge_size^2 patches side by side -> Linear -> GELU -> Linear."""

    def __init__(self, dim: int, out_dim: int, merge_size: int, rms_norm: bool) -> None:
        super().__init__()
        self.width = dim * merge_size**2
        self.ln_q = RMSNorm(dim, 1e-6) if rms_norm else LayerNorm(dim, 1e-6)
        self.mlp = nn.Sequential(
            ReplicatedLinear(self.width, self.width, bias=True), nn.GELU(), ReplicatedLinear(self.width, out_dim, bias=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.width))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, temporal: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(temporal, patch, patch), stride=(temporal, patch, patch),
                              bias=False)
        self.proj.weight.requires_grad_(False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # [N, C * T * P * P], or [N, C * P * P] (a still image's one frame, repeated over T here)
        # -> [N, dim]: a kernel the size of its stride is a linear map of each patch
        weight = self.proj.weight  # [dim, C, T, P, P]
        dim, channels, temporal = weight.shape[:3]
        if patches.shape[1] * temporal == weight[0].numel():
            patches = patches.view(-1, channels, 1, patches.shape[1] // channels).expand(-1, -1, temporal, -1)
        return F.linear(patches.reshape(patches.shape[0], -1).to(weight.dtype), weight.view(dim, -1))


class Qwen2VisionTransformer(nn.Module):
    """Qwen2-VL's tower (and, with `qwen2_5`, Qwen2.5-VL's)."""

    def __init__(self, config: Any, qwen2_5: bool = False) -> None:
        super().__init__()
        dim = int(config.hidden_size if qwen2_5 else config.embed_dim)
        out_dim = int(config.out_hidden_size if qwen2_5 else config.hidden_size)
        heads = int(config.num_heads)
        self.merge_size = int(config.spatial_merge_size)
        self.head_dim = dim // heads
        self.patch_embed = PatchEmbed(int(config.in_channels), int(config.temporal_patch_size), int(config.patch_size), dim)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, heads, self._mlp(config, dim, qwen2_5), rms_norm=qwen2_5) for _ in range(int(config.depth))
        )
        self.merger = PatchMerger(dim, out_dim, self.merge_size, rms_norm=qwen2_5)
        # Qwen2.5-VL: windows of this many tokens (merged patches) a side; None: full attention only
        self.window = int(config.window_size) // self.merge_size // int(config.patch_size) if qwen2_5 else None
        self.full_blocks = frozenset(int(i) for i in getattr(config, "fullatt_block_indexes", ()) or ())
        theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        quarter = torch.arange(0, self.head_dim // 2, 2, dtype=torch.float32, device="cpu") / (self.head_dim // 2)
        self.inv_freq = 1.0 / theta**quarter  # [head_dim / 4] on the host, where the positions are made

    @staticmethod
    def _mlp(config: Any, dim: int, qwen2_5: bool) -> nn.Module:
        if qwen2_5:
            return VisionGatedMLP(dim, int(config.intermediate_size), config.hidden_act)
        return VisionMLP(dim, int(dim * config.mlp_ratio), config.hidden_act)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """patches [N, C * P * P] of the images back to back, their grids -> image tokens
        [N / merge_size^2, out_dim], image by image."""
        device = patches.device
        x = self.patch_embed(patches)
        rope = self._rope(grids, device)
        images = _Segments([h * w for t, h, w in grids for _ in range(t)], device)
        windows, order = images, None  # Qwen2-VL: every block attends over its whole image
        if self.window is not None:  # Qwen2.5-VL: the patches window by window, merge block by merge block
            window_ids, window_lens = window_order(grids, self.merge_size, self.window)
            unit = self.merge_size**2
            order = to_device(window_ids, torch.long, device)
            x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)
            rope = tuple(r.view(-1, unit, *r.shape[1:])[order].flatten(0, 1) for r in rope)  # type: ignore[assignment]
            windows = _Segments([n * unit for n in window_lens], device)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, images if i in self.full_blocks else windows)
        tokens = self.merger(x)
        return tokens if order is None else tokens[torch.argsort(order)]  # (back in image order)

    def _rope(self, grids: Sequence[Grid], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, head_dim] float32 of each patch at its (row, column) in its image."""
        rows, cols = [], []
        m = self.merge_size
        for t, h, w in grids:
            # patch (row, col) in merge-block order: block (bh, bw), then (mh, mw) inside it
            r = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).transpose(1, 2).flatten()
            c = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).transpose(1, 2).flatten()
            rows.append(r.repeat(t))
            cols.append(c.repeat(t))
        freqs = torch.cat([torch.outer(torch.cat(rows).float(), self.inv_freq),
                           torch.outer(torch.cat(cols).float(), self.inv_freq)], dim=-1)  # [N, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return to_device(emb.cos(), torch.float32, device), to_device(emb.sin(), torch.float32, device)


def window_order(grids: Sequence[Grid], merge_size: int, window: int) -> tuple[list[int], list[int]]:
    """Qwen2.5-VL's windows: the merged tokens of every image, window by window (windows of
    `window` x `window` tokens in row-major order over each frame, row-major inside a window;
    windows at the right and bottom edges are smaller) -> (token indices in that order, the
    number of tokens of each window)."""
    order: list[int] = []
    lengths: list[int] = []
    base = 0
    for t, h, w in grids:
        hm, wm = h // merge_size, w // merge_size
        index = torch.arange(t * hm * wm).view(t, hm, wm)
        for frame in index:
            for y in range(0, hm, window):
                for x in range(0, wm, window):
                    ids = frame[y : y + window, x : x + window].flatten()
                    order.extend((ids + base).tolist())
                    lengths.append(ids.numel())
        base += t * hm * wm
    return order, lengths
