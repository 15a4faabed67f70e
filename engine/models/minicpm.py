"""MiniCPM 1 / 2 (`MiniCPMForCausalLM`, remote code): Llama with muP scalings.

Same layers and checkpoint names as Llama (the embedding usually tied to the LM head); three
multipliers from config.json (read by `engine.models.remote_config`, no remote code runs):
- the token embeddings are multiplied by `scale_emb`;
- each attention and MLP output by `scale_depth / sqrt(num_hidden_layers)` before it joins
  the residual stream;
- the final hidden states are divided by `hidden_size / dim_model_base` before the LM head.

MiniCPM3 (`MiniCPM3ForCausalLM`) uses multi-head latent attention, which waits for the MLA
issue (issue 22): it is refused at load with a message saying so.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from engine.models.causal_lm import CausalLM
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class MiniCPMForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(config, tp_rank, tp_size)
        self.scale_emb = float(getattr(config, "scale_emb", 1.0))
        self.residual_scale = float(getattr(config, "scale_depth", 1.0)) / math.sqrt(config.num_hidden_layers)
        self.logit_divisor = config.hidden_size / float(getattr(config, "dim_model_base", config.hidden_size))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # LlamaModel.forward with the three scalings; the residual add stays fused into the norms.
        model = self.model
        hidden = model.embed_tokens(input_ids) * self.scale_emb  # [T, hidden_size]
        residual: torch.Tensor | None = None
        for module in model.layers:
            layer = cast(LlamaDecoderLayer, module)
            if residual is None:
                residual, hidden = hidden, layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm(hidden, residual)
            hidden = layer.self_attn(positions, hidden) * self.residual_scale
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = layer.mlp(hidden) * self.residual_scale
        hidden, _ = model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden / self.logit_divisor).float()


class MiniCPM3ForCausalLM(CausalLM):
    """Not served yet: refused when the model is built."""

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        raise ValueError(
            "MiniCPM3 (MiniCPM3ForCausalLM) uses multi-head latent attention, which lightgate does not "
            "support yet (issue 22, MLA); MiniCPM 1 and 2 (MiniCPMForCausalLM) are supported"
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
