"""Shared model layers: one interface, plain torch on CPU (Triton kernels plug in on CUDA)."""

from engine.layers.activation import Activation, GeluAndMul, SiluAndMul
from engine.layers.attention import Attention, dequantize_int8, quantize_int8
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from engine.layers.norm import HeadLayerNorm, LayerNorm, RMSNorm
from engine.layers.rotary import (
    RotaryEmbedding,
    get_rope,
    interleaved_to_half_rows,
    rope_parameters_from_config,
)

__all__ = [
    "Activation",
    "Attention",
    "ColumnParallelLinear",
    "GeluAndMul",
    "HeadLayerNorm",
    "LayerNorm",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "VocabParallelEmbedding",
    "dequantize_int8",
    "get_rope",
    "interleaved_to_half_rows",
    "quantize_int8",
    "rope_parameters_from_config",
]
