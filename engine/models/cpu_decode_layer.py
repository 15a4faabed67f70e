"""A Llama-style decoder layer's decode step as one C++ op on the CPU (float32).

On the CPU a decode step's matrix products are small, and a layer's twenty-odd torch ops and
module calls between them (rotary, KV store, norms, SiLU) cost as much as the products.
`enable_cpu_kernels` runs once at load, for a model served with GGUF blocks (the kernel library
of `engine/kernels/gguf_cpu.cpp` is loaded then): it lets the model's RMSNorms and attention
layers take that library's decode ops, and gives each `PreNormDecoderLayer` whose wiring the
fused op computes a `CpuDecodeLayer`. That wiring: RMSNorm -> q | k | v product -> rotary
(`rotate_half` layout, partial rotary allowed) -> KV store -> decode attention (GQA, sliding
window) -> o product -> RMSNorm -> gate | up product -> SiLU-and-mul -> down product, with
optional biases, one rank, float32 norms, every linear in GGUF blocks or dense float32. Layers
with anything else (q/k norms, ALiBi, M-RoPE, another MLP or norm) keep their modules.

At run time a layer takes the op only in a decode-only step (every sequence one new token)
over a float32 KV pool (no int8 scales); every other step runs the modules as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import torch
from torch import nn

from engine.kernels import cpu_decode
from engine.kernels.gguf_cpu import MAX_DIRECT_ROWS
from engine.layers import Attention, RMSNorm, RotaryEmbedding, SiluAndMul
from engine.layers.gguf_linear import GGUFWeight
from engine.layers.linear import LinearBase
from engine.models.llama import LlamaAttention, LlamaMLP, PreNormDecoderLayer
from engine.worker.forward_context import ForwardContext

# ggml type id the op reads as a dense float32 weight [out, in] (ggml's own F32 id)
DENSE_FLOAT32 = 0
# Added to a segment's ggml type: its products take int8 activations (`GGUFWeight.int8_types`).
INT8_ACTIVATIONS = 1 << 8


@dataclass(slots=True)
class CpuDecodeLayer:
    """What the op needs of one layer, gathered once at load (references, no copies)."""

    layer_idx: int
    rotary: RotaryEmbedding
    input_norm: torch.Tensor  # [hidden] float32
    post_norm: torch.Tensor  # [hidden] float32
    weights: list[torch.Tensor]  # the row segments of qkv, o, gate_up, down, in that order
    qtypes: list[int]  # each segment's ggml type (+ INT8_ACTIVATIONS; DENSE_FLOAT32: a float32 [rows, in] weight)
    counts: list[int]  # segments per linear: [qkv, o, gate_up, down]
    biases: list[torch.Tensor | None]  # per linear
    shape: list[int]  # [num_heads, num_kv_heads, head_dim, sliding window (0: none), max direct rows]
    scale: float
    eps: float

    def usable(self, ctx: ForwardContext, hidden: torch.Tensor) -> bool:
        """Whether this step can take the op: decode-only within the block kernels' rows (more
        take the module path's products over many rows), float32 activations and KV pool."""
        return (
            ctx.is_decode_only
            and hidden.shape[0] <= self.shape[4]
            and ctx.kv.k_scale is None
            and hidden.dtype == torch.float32
            and ctx.kv.k[self.layer_idx].dtype == torch.float32
        )

    def __call__(
        self, ctx: ForwardContext, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden / residual: [B, hidden_size] -> (MLP output, residual), as PreNormDecoderLayer.forward
        cos, sin = _rope_rows(ctx, self.rotary, positions)
        return cpu_decode.decoder_layer(
            hidden, residual, self.input_norm, self.post_norm, self.weights, self.qtypes, self.counts, self.biases,
            cos, sin, ctx.kv.k[self.layer_idx], ctx.kv.v[self.layer_idx], ctx.out_slots, ctx.req_to_token,
            ctx.req_indices, ctx.seq_lens, self.shape, self.scale, self.eps,
        )  # fmt: skip


def _rope_rows(
    ctx: ForwardContext, rotary: RotaryEmbedding, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's cos / sin [B, rotary_dim] float32, looked up once per step for every layer."""
    key = ("cpu_decode_rope", id(rotary))
    cached = ctx.derived.get(key)
    if cached is None:
        cached = ctx.derived[key] = rotary.cos_sin_rows(positions)
    return cached  # type: ignore[return-value]


def _segments(linear: nn.Module) -> list[tuple[torch.Tensor, int]] | None:
    """A linear layer's weight as (rows, ggml type) segments the op reads, or None."""
    if not isinstance(linear, LinearBase) or linear.tp_size != 1:
        return None
    packed = linear.packed_weight
    if isinstance(packed, GGUFWeight):
        return [(s.blocks, s.qtype + (INT8_ACTIVATIONS if s.qtype in packed.int8_types else 0)) for s in packed.segments]
    weight = linear.weight
    if packed is None and weight.dtype == torch.float32 and weight.device.type == "cpu":
        return [(weight.data, DENSE_FLOAT32)]
    return None


def _is_plain_norm(norm: nn.Module) -> TypeGuard[RMSNorm]:
    return type(norm) is RMSNorm and norm.weight.dtype == torch.float32 and norm.weight.device.type == "cpu"


def _llama_parts(layer: nn.Module) -> tuple[LlamaAttention, LlamaMLP] | None:
    """The layer's attention and MLP when they are Llama's wiring that the op computes."""
    if not isinstance(layer, PreNormDecoderLayer) or type(layer).forward is not PreNormDecoderLayer.forward:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(attn, LlamaAttention) or type(attn).forward is not LlamaAttention.forward:
        return None
    if not isinstance(mlp, LlamaMLP) or type(mlp).forward is not LlamaMLP.forward or type(mlp.act_fn) is not SiluAndMul:
        return None
    if attn.q_norm is not None or type(attn.attn) is not Attention or attn.attn.alibi_slopes is not None:
        return None
    rotary = attn.rotary_emb
    if type(rotary) is not RotaryEmbedding or rotary.head_size != attn.head_dim or rotary.rotary_dim % 2:
        return None
    return attn, mlp


def fused_decode_layer(layer: nn.Module) -> CpuDecodeLayer | None:
    """The op's view of `layer`, or None where the op does not compute its wiring."""
    parts = _llama_parts(layer)
    if parts is None or not isinstance(layer, PreNormDecoderLayer):
        return None
    attn, mlp = parts
    first, second = layer.input_layernorm, layer.post_attention_layernorm
    if not (_is_plain_norm(first) and _is_plain_norm(second)) or first.eps != second.eps:
        return None
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    segments = [_segments(linear) for linear in linears]
    if any(s is None for s in segments):
        return None
    flat = [segment for linear_segments in segments for segment in linear_segments or []]
    inner = attn.attn
    return CpuDecodeLayer(
        layer_idx=inner.layer_idx,
        rotary=attn.rotary_emb,
        input_norm=first.weight.data,
        post_norm=second.weight.data,
        weights=[w for w, _ in flat],
        qtypes=[q for _, q in flat],
        counts=[len(s or []) for s in segments],
        biases=[None if linear.bias is None else linear.bias.data for linear in linears],
        shape=[inner.num_heads, inner.num_kv_heads, inner.head_dim, inner.sliding_window or 0, MAX_DIRECT_ROWS],
        scale=float(inner.scale),
        eps=float(first.eps),
    )


def enable_cpu_kernels(model: nn.Module) -> int:
    """Let `model`'s RMSNorms and attention layers take the C++ decode ops, and give each
    decoder layer the op computes its `CpuDecodeLayer`. Call once the weights are in (GGUF
    blocks attached), with the kernel library loaded. Returns how many layers take the op."""
    count = 0
    for module in model.modules():
        if isinstance(module, (RMSNorm, Attention)):
            module.cpu_kernels = True
        if isinstance(module, PreNormDecoderLayer):
            module.fused_decode = fused_decode_layer(module)
            count += module.fused_decode is not None
    return count
