"""Token embedding and LM head, sharded along the vocabulary.

Rank r owns vocabulary rows [r * shard, (r + 1) * shard) where shard = ceil(vocab / tp); the
last shard is zero-padded. With tp > 1 the embedding output is summed over ranks (each rank
contributes zeros for ids it does not own) and the logits are gathered along the vocabulary;
with tp == 1 (or outside a tensor-parallel group) both collectives are the identity.
The weight loaders narrow a checkpoint's `LazyWeight` to the rank's rows before reading, so a
rank reads only its part of the vocabulary from disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import WeightLike, all_gather, all_reduce, read_weight
from engine.layers import cpu_gemm
from engine.layers.gguf_linear import GGUFWeight, QuantizedRows


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings  # the real vocabulary size
        self.embedding_dim = embedding_dim
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.shard_size = -(-num_embeddings // tp_size)
        # min(): with a tiny vocabulary the last rank may own no rows at all
        self.vocab_start = min(tp_rank * self.shard_size, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        # [shard_size, embedding_dim]; rows past vocab_end (last rank only) stay zero.
        self.weight = nn.Parameter(
            torch.empty(self.shard_size, embedding_dim, dtype=params_dtype), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        # A GGUF file's quantized rows, kept as blocks (engine.layers.gguf_linear); the weight
        # is then on the meta device.
        self.gguf_weight: GGUFWeight | None = None

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        shape = tuple(loaded_weight.shape)
        if len(shape) != 2 or shape[1] != self.embedding_dim or shape[0] < self.num_embeddings:
            raise ValueError(
                f"embedding shape mismatch: parameter ({self.num_embeddings}, {self.embedding_dim}) "
                f"before sharding, checkpoint {shape}"
            )
        self._load_rows(param, loaded_weight)

    def _load_rows(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        """Read this rank's vocabulary rows [vocab_start, vocab_end) only; zero the padding."""
        owned = self.vocab_end - self.vocab_start
        param.data[owned:].zero_()
        if owned:
            rows = loaded_weight.narrow(0, self.vocab_start, owned)
            if not (isinstance(rows, QuantizedRows) and rows.take(param.data[:owned])):
                param.data[:owned].copy_(read_weight(rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] int64 -> [num_tokens, embedding_dim]
        if self.gguf_weight is not None:  # one rank: the tokens' rows dequantized
            return self.gguf_weight.rows(input_ids).to(self.weight.dtype)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)
        return all_reduce(out * owned.unsqueeze(-1).to(out.dtype))

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, dim={self.embedding_dim}, tp={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states onto the vocabulary: logits = hidden @ W.T (+ b)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size, params_dtype)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shard_size, dtype=params_dtype), requires_grad=False)
            self.bias.weight_loader = self.bias_loader  # type: ignore[attr-defined]
        # CPU layout, see cpu_gemm
        self.packed_weight: torch.Tensor | cpu_gemm.QuantizedWeight | GGUFWeight | None = None

    def bias_loader(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        if loaded_weight.dim() != 1 or loaded_weight.shape[0] < self.num_embeddings:
            raise ValueError(f"lm_head bias shape mismatch: checkpoint {tuple(loaded_weight.shape)}")
        self._load_rows(param, loaded_weight)

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share the input embedding's weight (tie_word_embeddings)."""
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_rows, embedding_dim] -> logits [num_rows, vocab] on every rank
        logits = cpu_gemm.linear(hidden, self.weight, self.bias, self.packed_weight)
        if self.tp_size > 1:
            logits = all_gather(logits)  # [num_rows, shard * tp]; the shard alone outside a group
        if logits.shape[-1] > self.num_embeddings:
            logits = logits[:, : self.num_embeddings]  # the last shard's zero padding
        return logits
