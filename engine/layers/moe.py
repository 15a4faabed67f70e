"""Mixture-of-experts: routing (`select_experts`) and the experts' gated MLPs (`FusedMoE`).

A router scores every expert for every token; each token runs through its `top_k` experts
only, and its output is their outputs weighted by the routing weights.

The experts' weights are stacked: `gate_up.weight` [E, 2 * I, H] (each expert's gate rows, then
its up rows) and `down.weight` [E, H, I]. With tensor parallelism each expert is split as a
dense MLP is: rank r holds rows [r * I / tp, (r + 1) * I / tp) of every expert's gate and up
(a column split) and the same columns of its down (a row split), so the experts' sum is a
partial sum that the caller all-reduces (once, with whatever else it adds to it).

Checkpoints keep one tensor per expert and projection (`experts.N.gate_proj.weight`, Mixtral's
`experts.N.w1.weight`); `expert_packed_mapping` maps each to its stacked parameter and a shard
id "part:N" for the loaders. Checkpoints that stack them already (`experts.gate_up_proj`
[E, 2 * I, H], `experts.down_proj` [E, H, I]) load whole (shard id None).

Two implementations of one function:
- torch (the CPU path and the reference): the (token, expert) pairs are sorted by expert and
  each expert that has tokens runs one product over its tokens; no expert runs on a token
  that did not pick it.
- Triton (`engine.kernels.fused_moe`, on CUDA): pairs sorted by expert on the device, grouped
  GEMMs, no host synchronisation, so it runs inside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import WeightLike, all_reduce, read_weight
from engine.layers import cpu_gemm
from engine.layers.backend import use_triton

EXPERT_PARTS = ("gate", "up", "down")


@dataclass(frozen=True, slots=True)
class Routing:
    """How router logits pick experts.

    top_k experts by softmax probability; `renormalize` rescales the chosen weights to sum to
    1 (Mixtral, `norm_topk_prob`); `routed_scaling_factor` multiplies them afterwards.

    Grouped (device-limited) top-k, DeepSeek-V2's `group_limited_greedy`: the experts form
    `num_groups` groups of consecutive ids, each group scores its best expert's probability,
    and a token's top_k come from the experts of its `topk_groups` best groups only.
    """

    top_k: int
    renormalize: bool
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1

    def __post_init__(self) -> None:
        if self.num_groups < 1 or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"grouped top-k needs 1 <= topk_group <= n_group, got n_group={self.num_groups}, "
                f"topk_group={self.topk_groups}"
            )

    def check_experts(self, num_experts: int) -> None:
        """Raises unless `num_experts` experts can be routed this way."""
        if not 0 < self.top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {self.top_k}")
        if self.num_groups > 1:
            if num_experts % self.num_groups:
                raise ValueError(f"n_group={self.num_groups} does not divide the {num_experts} experts")
            if self.top_k > self.topk_groups * (num_experts // self.num_groups):
                raise ValueError(
                    f"top_k={self.top_k} exceeds the {self.topk_groups} groups' "
                    f"{self.topk_groups * (num_experts // self.num_groups)} experts"
                )


def select_experts(router_logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, top_k] float32, expert ids [T, top_k] int64).

    The softmax runs in float32 over every expert; with groups, the experts outside a token's
    `topk_groups` best groups (by their best expert's probability) are dropped (their
    probability set to 0) before its top_k; the top_k probabilities are the weights
    (renormalised over the chosen ones where `routing.renormalize`), times
    `routed_scaling_factor`.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    if routing.num_groups > 1:
        grouped = probs.view(probs.shape[0], routing.num_groups, -1)
        best_groups = torch.topk(grouped.amax(dim=-1), routing.topk_groups, dim=-1).indices  # [T, topk_groups]
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=probs.device)
        keep.scatter_(1, best_groups, True)
        probs = grouped.masked_fill(~keep.unsqueeze(-1), 0.0).view_as(probs)
    weights, ids = torch.topk(probs, routing.top_k, dim=-1)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routing.routed_scaling_factor != 1.0:
        weights = weights * routing.routed_scaling_factor
    return weights, ids


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def _copy(dst: torch.Tensor, src: WeightLike) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight shape mismatch: parameter {tuple(dst.shape)}, checkpoint {tuple(src.shape)}")
    dst.copy_(read_weight(src))


def _check_stacked(loaded_weight: WeightLike, dim: int, expected: int) -> None:
    if loaded_weight.dim() != 3 or loaded_weight.shape[dim] != expected:
        raise ValueError(
            f"stacked expert weight needs {expected} along dim {dim}, checkpoint {tuple(loaded_weight.shape)}"
        )


def _parse_shard(shard_id: str) -> tuple[str, int]:
    part, _, expert = shard_id.partition(":")
    if part not in EXPERT_PARTS or not expert.isdigit():
        raise ValueError(f"expert shard id must be 'gate:N', 'up:N' or 'down:N', got {shard_id!r}")
    return part, int(expert)


class ExpertGateUp(nn.Module):
    """Every expert's gate | up rows of this rank: weight [E, 2 * I / tp, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp_rank: int, tp_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size  # whole, all ranks
        self.shard = _divide(intermediate_size, tp_size)
        self.tp_rank = tp_rank
        self.weight = nn.Parameter(torch.empty(num_experts, 2 * self.shard, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id: str | None = None) -> None:
        if shard_id is None:  # stacked already: [E, 2 * I, H], each expert's gate then up
            _check_stacked(loaded_weight, 1, 2 * self.intermediate_size)
            for i in range(2):
                start = i * self.intermediate_size + self.tp_rank * self.shard
                dst = param.data[:, i * self.shard : (i + 1) * self.shard]
                _copy(dst, loaded_weight.narrow(1, start, self.shard))
            return
        part, e = _parse_shard(shard_id)
        if loaded_weight.shape[0] != self.intermediate_size:
            raise ValueError(f"expert {part} needs {self.intermediate_size} rows, checkpoint {tuple(loaded_weight.shape)}")
        offset = 0 if part == "gate" else self.shard
        _copy(param.data[e, offset : offset + self.shard], loaded_weight.narrow(0, self.tp_rank * self.shard, self.shard))


class ExpertDown(nn.Module):
    """Every expert's down columns of this rank: weight [E, H, I / tp]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp_rank: int, tp_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.shard = _divide(intermediate_size, tp_size)
        self.tp_rank = tp_rank
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.shard), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id: str | None = None) -> None:
        start = self.tp_rank * self.shard
        if shard_id is None:  # stacked already: [E, H, I]
            _check_stacked(loaded_weight, 2, self.intermediate_size)
            _copy(param.data, loaded_weight.narrow(2, start, self.shard))
            return
        _, e = _parse_shard(shard_id)
        if loaded_weight.shape[1] != self.intermediate_size:
            raise ValueError(f"expert down needs {self.intermediate_size} columns, checkpoint {tuple(loaded_weight.shape)}")
        _copy(param.data[e], loaded_weight.narrow(1, start, self.shard))


def expert_packed_mapping(num_experts: int, names: tuple[str, str, str]) -> dict[str, tuple[str, str]]:
    """Checkpoint name parts -> (stacked parameter part, shard id), for `packed_modules_mapping`.

    names: the checkpoint's (gate, up, down) projection names, e.g. ("gate_proj", "up_proj",
    "down_proj") or Mixtral's ("w1", "w3", "w2"). `experts.3.gate_proj` -> ("experts.gate_up",
    "gate:3"); a stacked checkpoint's `experts.gate_up_proj` loads whole.
    """
    mapping: dict[str, tuple[str, str]] = {}
    for e in range(num_experts):
        for name, part in zip(names, EXPERT_PARTS, strict=True):
            target = "experts.down" if part == "down" else "experts.gate_up"
            mapping[f"experts.{e}.{name}"] = (target, f"{part}:{e}")
    return mapping


# Per expert, its gate | up and down weights packed for oneDNN (`cpu_gemm.pack_weight`).
PackedExperts = list[tuple[torch.Tensor, torch.Tensor]]


def fused_experts_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights / ids [T, k] -> sum_j weights[t, j] *
    expert_{ids[t, j]}(x[t]): [T, H] in x's dtype. Only the chosen experts run, each once over
    the tokens that chose it (through its `packed` weights where given)."""
    num_tokens, top_k = ids.shape
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # the (token, choice) pairs grouped by expert
    token_of = order // top_k
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    rows = x[token_of]
    out_rows = torch.empty(rows.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        chunk = rows[start : start + n]
        if packed is not None and x.dtype == w13.dtype:
            gate, up = cpu_gemm.packed_linear(chunk, packed[e][0], None).chunk(2, dim=-1)
            out_rows[start : start + n] = cpu_gemm.packed_linear(F.silu(gate) * up, packed[e][1], None).float()
        else:
            gate, up = F.linear(chunk, w13[e]).chunk(2, dim=-1)
            out_rows[start : start + n] = F.linear(F.silu(gate) * up, w2[e]).float()
        start += n
    out_rows *= weights.flatten()[order].unsqueeze(1).float()
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token_of, out_rows).to(x.dtype)


class FusedMoE(nn.Module):
    """The routed experts of one layer (SiLU-gated MLPs), this rank's share of each.

    forward(x [T, H], router_logits [T, E]) -> [T, H]: this rank's partial sum (not reduced
    over the tensor-parallel ranks; the caller all-reduces it).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        routing: Routing,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        routing.check_experts(num_experts)
        self.num_experts = num_experts
        self.routing = routing
        self.gate_up = ExpertGateUp(num_experts, hidden_size, intermediate_size, tp_rank, tp_size)
        self.down = ExpertDown(num_experts, hidden_size, intermediate_size, tp_rank, tp_size)
        self.packed: PackedExperts | None = None  # CPU: set after loading (`pack_cpu_weights`)

    def pack_cpu_weights(self) -> int:
        """Pack every expert's weights for oneDNN (CPU only; `cpu_gemm.pack_model_weights` calls
        it after loading), as the linear layers are packed; returns how many matrices."""
        w13, w2 = self.gate_up.weight, self.down.weight
        if not cpu_gemm.can_pack(w13[0]) or not cpu_gemm.can_pack(w2[0]):
            return 0
        self.packed = [(cpu_gemm.pack_weight(w13[e]), cpu_gemm.pack_weight(w2[e])) for e in range(self.num_experts)]
        return 2 * self.num_experts

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.routing)
        if use_triton() and x.is_cuda:
            from engine.kernels.fused_moe import fused_experts

            return fused_experts(x, self.gate_up.weight, self.down.weight, weights, ids)
        return fused_experts_torch(x, self.gate_up.weight, self.down.weight, weights, ids, self.packed)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.routing.top_k}, renormalize={self.routing.renormalize}"


class RouterLinear(nn.Module):
    """A small replicated projection (the router, a shared expert's gate): weight [out, in]
    in the model's dtype, never packed or quantized. The router's logits decide which experts
    run, so they keep the model's precision (and an FP8 product needs `out` a multiple of 16).
    With `float32`, the weight is kept and the product runs in float32 whatever the model's
    dtype (DeepSeek's router, as transformers keeps it: a float32 checkpoint weight stays exact)."""

    def __init__(self, input_size: int, output_size: int, float32: bool = False) -> None:
        super().__init__()
        self.float32 = float32
        dtype = torch.float32 if float32 else None
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out] (float32 where `float32`)
        return F.linear(x.float() if self.float32 else x, self.weight)


class SparseMoeBlock(nn.Module):
    """A layer's MLP as a mixture of experts: a router (`gate`, replicated), the routed
    experts, and optionally an expert every token runs (`shared_expert`, any module that maps
    [T, H] -> this rank's partial sum [T, H], not reduced: a dense MLP built with
    `reduce_results=False`), scaled by sigmoid(`shared_expert_gate`) where the family has one
    (Qwen2-MoE; a per-token scale, so it applies to the partial sums alike). `router_float32`
    computes the router's logits in float32 (`RouterLinear`).

    forward(x [T, H]) -> [T, H], summed over the tensor-parallel ranks by one all-reduce.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        intermediate_size: int,
        routing: Routing,
        tp_rank: int = 0,
        tp_size: int = 1,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: bool = False,
        router_float32: bool = False,
    ) -> None:
        super().__init__()
        self.tp_size = tp_size
        self.gate = RouterLinear(hidden_size, num_experts, router_float32)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, routing, tp_rank, tp_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = RouterLinear(hidden_size, 1) if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return all_reduce(out) if self.tp_size > 1 else out
