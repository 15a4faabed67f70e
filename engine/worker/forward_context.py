"""Per-step attention metadata: the one global the model reads during a forward pass.

The model runner builds a `ForwardContext` for each step and installs it with
`set_forward_context`; attention layers read it with `get_forward_context()`. Nothing else
in a forward pass is global.

A step is a packed (padding-free) batch of `num_seqs` sequences. Sequence i contributes
`new_lens[i]` new tokens at positions `start_pos[i] .. start_pos[i] + new_lens[i] - 1`; its
earlier `start_pos[i]` tokens are already in the KV pool, at the slots
`req_to_token[req_indices[i], :start_pos[i]]`. The new tokens' K/V go to `out_slots`, which
the runner has also written into `req_to_token` before the forward pass, so after the store
`req_to_token[req_indices[i], :seq_lens[i]]` names every key of sequence i.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine.worker.transfer import to_device

# dtype of the per (slot, kv head) scales of an int8 pool. Two bytes keep an int8 token at
# head_dim + 2 bytes per head (1.94x the bf16 capacity at head_dim 64, where a float32 scale
# would give 1.88x); bfloat16 has float32's range, so no scale underflows or overflows, and
# values are quantized against the rounded scale, so its 8-bit mantissa costs no accuracy.
INT8_KV_SCALE_DTYPE = torch.bfloat16


@dataclass(slots=True)
class KVPool:
    """Token-granular KV memory: one K and one V tensor per layer.

    k[layer]: [num_slots + 1, num_kv_heads, head_dim]; the last slot is a dummy that padded
    entries point at. With int8 KV, `k_scale[layer]`: [num_slots + 1, num_kv_heads]
    (`INT8_KV_SCALE_DTYPE`), and k[layer] ~= k_int8 * k_scale[layer][..., None].
    Multi-head latent attention keeps no V: `v` is empty and `v_scale` None, and k[layer]
    [num_slots + 1, 1, kv_lora_rank + qk_rope_head_dim] holds each token's latent and rotary key
    (engine/layers/mla.py).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    k_scale: list[torch.Tensor] | None = None
    v_scale: list[torch.Tensor] | None = None

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0] - 1

    @property
    def dummy_slot(self) -> int:
        return self.k[0].shape[0] - 1


@dataclass(slots=True)
class ForwardContext:
    kv: KVPool
    req_to_token: torch.Tensor  # [max_running_requests, max_model_len] int32
    req_indices: torch.Tensor  # [num_seqs] int64: each sequence's row in req_to_token
    start_pos: torch.Tensor  # [num_seqs] int64: tokens already cached
    new_lens: torch.Tensor  # [num_seqs] int64: new tokens this step
    seq_lens: torch.Tensor  # [num_seqs] int64: start_pos + new_lens
    cu_new_lens: torch.Tensor  # [num_seqs + 1] int64: offsets of each sequence in the packed tokens
    out_slots: torch.Tensor  # [num_tokens] int64: KV slot of each new token
    positions: torch.Tensor  # [num_tokens] int64 (an M-RoPE step with image tokens: [3, num_tokens], model_runner.py)
    # Host copies of the small vectors, for the torch path's per-sequence loops (no syncs).
    start_pos_list: list[int]
    new_lens_list: list[int]
    req_indices_list: list[int]
    is_decode_only: bool  # every sequence has exactly one new token
    max_seq_len: int
    # Splits per sequence of the decode attention launch when fixed (a CUDA graph's launch,
    # sized for any length); None: sized from max_seq_len.
    decode_num_splits: int | None = None
    # A fixed-length tile table for the prefill attention launch (a CUDA graph's launch, see
    # engine/kernels/prefill_attention.py); None: the grid is sized from the host lengths.
    # When set, the step may hold padding tokens past cu_new_lens[-1]: attention writes zeros
    # for them.
    prefill_tiles: torch.Tensor | None = None
    # A packed step whose first `decode_rows` sequences may each hold one new token (at packed
    # row b for sequence b): their attention is the decode kernel's (a query per kv head group,
    # not a query tile per head), with `decode_seq_lens` [decode_rows] their lengths, 0 for a
    # row that is not such a decode (a CUDA graph's launch is sized for the bucket, not the step);
    # the other sequences take the prefill kernel. 0: every sequence takes the prefill kernel.
    decode_rows: int = 0
    decode_seq_lens: torch.Tensor | None = None
    # Tensors derived from the metadata once per step and shared by every layer (e.g. the
    # padded slot grid of a batched decode), keyed by what they depend on.
    derived: dict[object, object] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.new_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.out_slots.shape[0])


_context: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("no forward context is set: run the model through the model runner")
    return _context


def current_forward_context() -> ForwardContext | None:
    """The context of the running step, or None outside the model runner (unit tests)."""
    return _context


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _context
    previous, _context = _context, ctx
    try:
        yield
    finally:
        _context = previous


def build_forward_context(
    kv: KVPool,
    req_to_token: torch.Tensor,
    req_indices: list[int],
    start_pos: list[int],
    new_lens: list[int],
    out_slots: torch.Tensor,
) -> ForwardContext:
    """Build the metadata of one step from host lists (CPU path and tests)."""
    device = req_to_token.device
    seq_lens = [s + n for s, n in zip(start_pos, new_lens, strict=True)]
    cu = [0]
    for n in new_lens:
        cu.append(cu[-1] + n)
    positions = torch.cat(
        [torch.arange(s, s + n, dtype=torch.int64) for s, n in zip(start_pos, new_lens, strict=True)]
    ) if new_lens else torch.zeros(0, dtype=torch.int64)
    as_tensor = lambda xs: to_device(xs, torch.int64, device)  # noqa: E731
    decode_rows = leading_decodes(new_lens)
    seq_lens_t = as_tensor(seq_lens)
    ctx = ForwardContext(
        kv=kv,
        req_to_token=req_to_token,
        req_indices=as_tensor(req_indices),
        start_pos=as_tensor(start_pos),
        new_lens=as_tensor(new_lens),
        seq_lens=seq_lens_t,
        cu_new_lens=as_tensor(cu),
        out_slots=to_device(out_slots, torch.int64, device),
        positions=to_device(positions, torch.int64, device),
        start_pos_list=list(start_pos),
        new_lens_list=list(new_lens),
        req_indices_list=list(req_indices),
        is_decode_only=decode_rows == len(new_lens),
        max_seq_len=max(seq_lens, default=0),
    )
    if 0 < decode_rows < len(new_lens):
        ctx.decode_rows = decode_rows
        ctx.decode_seq_lens = seq_lens_t[:decode_rows]
    return ctx


def leading_decodes(new_lens: Sequence[int]) -> int:
    """How many sequences at the front of a step have one new token each (the decode kernel's
    rows of a packed step: the scheduler puts the running decodes first)."""
    count = 0
    for n in new_lens:
        if n != 1:
            break
        count += 1
    return count
