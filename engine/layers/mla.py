"""Multi-head latent attention (MLA) over the token-granular KV pool.

A token's keys and values are not stored per head. Each token keeps, per layer, one compressed
latent c [r] (r = kv_lora_rank, already through kv_a_layernorm) and one rotary key k_pe [dr]
(dr = qk_rope_head_dim, already rotated) shared by every head: `kv.k[layer]` is
[num_slots + 1, 1, r + dr] with [c | k_pe] side by side, and the pool has no V. Head h's key is
[W_uk[h] c | k_pe] and its value W_uv[h] c, where kv_b_proj's weight [H * (dn + dv), r] holds
W_uk[h] [dn, r] and W_uv[h] [dv, r] for each head in turn.

Two ways to attend, with the same result:
- expanded: kv_b_proj turns every key's latent into per-head k_nope / v, then attention as
  usual with head size dn + dr (values dv). It costs the expansion of every key once, cheap
  per query when the queries are many (a long prefill).
- absorbed: each query's q_nope is taken into latent space (q_nope W_uk[h], [r]) so that
  q . k = [q_nope W_uk[h] | q_pe] . [c | k_pe]: attention of H query rows over one shared
  "head" of r + dr, whose values are the latents c themselves; the output o_c [r] goes back
  through W_uv[h]. No key is expanded: a decode reads r + dr values per key.
A decode-only step always takes the absorbed form, on CUDA with the Triton backend through
`engine/kernels/mla_decode.py`, else over a padded [B, L] batch in torch; the sequences of a
packed step take whichever form costs fewer multiply-adds (`_absorbed_is_cheaper`), in torch.

int8: one scale per token and layer over its r + dr values (`quantize_int8`), as a per-head
pool keeps one per token and kv head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.attention import decode_grid, dequantize_int8, quantize_int8
from engine.layers.backend import use_triton
from engine.layers.linear import LinearBase
from engine.worker.forward_context import ForwardContext, KVPool, get_forward_context


class MLAAttention(nn.Module):
    """The attention core of an MLA layer: stores [latent | rotary key] and attends.

    `kv_b_proj` is the layer's column-parallel kv_b_proj (this rank's heads); the absorbed form
    reads its weight, the expanded form calls it.
    """

    def __init__(
        self,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        scale: float,
        layer_idx: int,
        kv_b_proj: LinearBase,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads  # on this rank
        self.kv_lora_rank = kv_lora_rank
        self.nope_dim = qk_nope_head_dim
        self.rope_dim = qk_rope_head_dim
        self.v_dim = v_head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        self._kv_b_proj = [kv_b_proj]  # a list: not registered twice as a submodule

    # ---- kv_b's two halves -----------------------------------------------------------------

    def _kv_b_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [H, dn, r], W_uv [H, dv, r]) in `dtype`: views of kv_b_proj's weight, or a
        dequantized copy of an FP8 one."""
        proj = self._kv_b_proj[0]
        weight: torch.Tensor = proj.weight
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # e4m3 + row scales
            weight = weight.float() * proj.weight_scale
        weight = weight.to(dtype).view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return weight[:, : self.nope_dim], weight[:, self.nope_dim :]

    def _absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        # q_nope [n, H, dn], q_pe [n, H, dr] -> [n, H, r + dr]: the query in latent space
        w_uk, _ = self._kv_b_weight(q_nope.dtype)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [n, H, r]
        return torch.cat((q_latent, q_pe), dim=-1)

    def _unabsorb_output(self, o_latent: torch.Tensor) -> torch.Tensor:
        # o_latent [n, H, r] -> [n, H, dv]
        _, w_uv = self._kv_b_weight(o_latent.dtype)
        return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    # ---- KV pool access --------------------------------------------------------------------

    def _store(self, kv: KVPool, slots: torch.Tensor, entries: torch.Tensor) -> None:
        # entries: [T, 1, r + dr]
        pool = kv.k[self.layer_idx]
        if kv.k_scale is not None:
            values, scales = quantize_int8(entries, kv.k_scale[self.layer_idx].dtype)
            pool.index_copy_(0, slots, values)
            kv.k_scale[self.layer_idx].index_copy_(0, slots, scales)
        else:
            pool.index_copy_(0, slots, entries.to(pool.dtype))

    def _read(self, kv: KVPool, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # slots: any shape S -> [*S, r + dr] in `dtype`
        pool = kv.k[self.layer_idx]
        entries = pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])  # [*S, 1, r + dr]
        if kv.k_scale is not None:
            entries = dequantize_int8(entries, kv.k_scale[self.layer_idx][slots], dtype)
        return entries.squeeze(-2).to(dtype)

    # ---- forward ---------------------------------------------------------------------------

    def forward(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor
    ) -> torch.Tensor:
        """q_nope [T, H, dn], q_pe [T, H, dr] (rotated), latent [T, r] (normed), k_pe [T, dr]
        (rotated): this step's tokens -> attention output [T, H * dv], before o_proj."""
        ctx = get_forward_context()
        num_tokens = q_nope.shape[0]
        entries = torch.cat((latent, k_pe), dim=-1)  # [T, r + dr]
        self._store(ctx.kv, ctx.out_slots, entries.unsqueeze(1))
        if ctx.is_decode_only:
            out = self._decode(ctx, q_nope, q_pe)
        else:
            out = self._per_sequence(ctx, q_nope, q_pe, entries)
        return out.reshape(num_tokens, self.num_heads * self.v_dim)

    def _decode(self, ctx: ForwardContext, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        # One new token per sequence: the absorbed form, H query rows of the one latent "head"
        q = self._absorb_query(q_nope, q_pe)  # [B, H, r + dr]
        if use_decode_kernel(q):
            k_scale = ctx.kv.k_scale[self.layer_idx] if ctx.kv.k_scale is not None else None
            o_latent = mla_decode_attention(
                q, ctx.kv.k[self.layer_idx], ctx.req_to_token, ctx.req_indices, ctx.seq_lens, self.kv_lora_rank,
                self.scale, ctx.max_seq_len, pool_scale=k_scale, num_splits=ctx.decode_num_splits,
            )
            return self._unabsorb_output(o_latent)
        # torch: over the padded [B, L] grid of latents
        slots, bias = decode_grid(ctx, None, q_nope.dtype)
        return self._decode_torch(q, slots, bias)

    def _decode_torch(self, q: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # q [B, H, r + dr] absorbed, slots [B, L], bias [B, 1, 1, L] or None -> [B, H, dv]
        keys = self._read(get_forward_context().kv, slots, q.dtype).unsqueeze(1)  # [B, 1, L, r + dr]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(1), keys, keys[..., : self.kv_lora_rank], attn_mask=bias, scale=self.scale
        )  # [B, 1, H, r]
        return self._unabsorb_output(o.view(q.shape[0], self.num_heads, self.kv_lora_rank))

    def _leading_decodes(self, ctx: ForwardContext, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """A packed step's first `ctx.decode_rows` sequences, one new token each at packed rows
        0 .. D-1: batched as a decode step (the kernel on the GPU), not one attention each."""
        rows = ctx.decode_rows
        q = self._absorb_query(q_nope[:rows], q_pe[:rows])  # [D, H, r + dr]
        max_len = max(ctx.start_pos_list[:rows]) + 1
        if use_decode_kernel(q):
            k_scale = ctx.kv.k_scale[self.layer_idx] if ctx.kv.k_scale is not None else None
            o_latent = mla_decode_attention(
                q, ctx.kv.k[self.layer_idx], ctx.req_to_token, ctx.req_indices[:rows], ctx.seq_lens[:rows],
                self.kv_lora_rank, self.scale, max_len, pool_scale=k_scale, num_splits=None,
            )
            return self._unabsorb_output(o_latent)
        slots, bias = leading_decode_grid(ctx, max_len, q.dtype)
        return self._decode_torch(q, slots, bias)

    def _per_sequence(
        self, ctx: ForwardContext, q_nope: torch.Tensor, q_pe: torch.Tensor, new_entries: torch.Tensor
    ) -> torch.Tensor:
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim)
        # A sequence without a cached prefix attends to exactly this step's entries when the
        # pool holds them unchanged (same dtype, not int8): no need to read them back.
        pool_is_exact = ctx.kv.k_scale is None and ctx.kv.k[self.layer_idx].dtype == q_nope.dtype
        offset = ctx.decode_rows
        if offset:
            out[:offset] = self._leading_decodes(ctx, q_nope, q_pe)
        for row, start, num_new in zip(ctx.req_indices_list[offset:], ctx.start_pos_list[offset:],
                                       ctx.new_lens_list[offset:], strict=True):
            seq_len = start + num_new
            if start == 0 and pool_is_exact:
                keys = new_entries[offset : offset + num_new]
            else:
                keys = self._read(ctx.kv, ctx.req_to_token[row, :seq_len].long(), q_nope.dtype)  # [L, r + dr]
            part = slice(offset, offset + num_new)
            mask = _causal_mask(start, num_new, seq_len, q_nope.device)
            if self._absorbed_is_cheaper(num_new, seq_len):
                out[part] = self._attend_absorbed(q_nope[part], q_pe[part], keys, mask)
            else:
                out[part] = self._attend_expanded(q_nope[part], q_pe[part], keys, mask)
            offset += num_new
        return out

    def _absorbed_is_cheaper(self, num_new: int, seq_len: int) -> bool:
        """Multiply-adds per head: the expanded form expands every key (L r (dn + dv)) and
        attends at head size dn + dr, values dv; the absorbed one moves each query in and out of
        latent space (n r (dn + dv)) and attends at r + dr, values r."""
        r, dn, dr, dv = self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim
        expanded = seq_len * r * (dn + dv) + num_new * seq_len * (dn + dr + dv)
        absorbed = num_new * r * (dn + dv) + num_new * seq_len * (2 * r + dr)
        return absorbed < expanded

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # q_nope [n, H, dn], q_pe [n, H, dr], keys [L, r + dr] -> [n, H, dv]
        num_new = q_nope.shape[0]
        q = self._absorb_query(q_nope, q_pe).transpose(0, 1).unsqueeze(0)  # [1, H, n, r + dr]
        k = keys.unsqueeze(0).unsqueeze(0)  # [1, 1, L, r + dr]: one "head" for all
        o = F.scaled_dot_product_attention(
            q, k, k[..., : self.kv_lora_rank], attn_mask=mask, is_causal=mask is None and num_new > 1,
            scale=self.scale, enable_gqa=True,
        )  # [1, H, n, r]
        return self._unabsorb_output(o[0].transpose(0, 1))

    def _attend_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # q_nope [n, H, dn], q_pe [n, H, dr], keys [L, r + dr] -> [n, H, dv]
        num_new, seq_len = q_nope.shape[0], keys.shape[0]
        kv = self._kv_b_proj[0](keys[:, : self.kv_lora_rank]).view(seq_len, self.num_heads, -1)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [L, H, dn], [L, H, dv]
        k_pe = keys[:, None, self.kv_lora_rank :].expand(seq_len, self.num_heads, self.rope_dim)
        k = torch.cat((k_nope, k_pe), dim=-1)  # [L, H, dn + dr]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [n, H, dn + dr]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=mask is None and num_new > 1, scale=self.scale,
        )  # [1, H, n, dv]
        return o[0].transpose(0, 1)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, qk_nope={self.nope_dim}, "
            f"qk_rope={self.rope_dim}, v={self.v_dim}, layer={self.layer_idx}"
        )


def mla_decode_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
    """engine/kernels/mla_decode.py's launcher, imported when first used (it imports triton)."""
    from engine.kernels.mla_decode import mla_decode_attention as launch

    return launch(*args, **kwargs)


def use_decode_kernel(q: torch.Tensor) -> bool:
    """Decode-only steps take the Triton kernel (engine/kernels/mla_decode.py) on CUDA with the
    Triton backend."""
    return q.is_cuda and use_triton()


def leading_decode_grid(ctx: ForwardContext, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded slot ids [D, L] and additive mask [D, 1, 1, L] of a packed step's leading
    decodes (the torch path), once per step for every layer."""
    key = ("mla_leading_decodes", dtype)
    cached = ctx.derived.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    rows = ctx.decode_rows
    slots = ctx.req_to_token[ctx.req_indices[:rows], :max_len].long()  # [D, L]
    valid = torch.arange(max_len, device=slots.device).unsqueeze(0) < ctx.seq_lens[:rows].unsqueeze(1)
    slots = torch.where(valid, slots, ctx.kv.dummy_slot)  # padding may hold stale slot ids
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
    ctx.derived[key] = (slots, bias[:, None, None, :])
    return ctx.derived[key]  # type: ignore[return-value]


def _causal_mask(start: int, num_new: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [n, L] mask (True = attend) for new tokens at start .. seq_len - 1, or None when
    plain `is_causal` (no prefix) or nothing (one token, which sees every key) suffices."""
    if start == 0 or num_new == 1:
        return None
    q_pos = torch.arange(start, seq_len, device=device).unsqueeze(1)
    return torch.arange(seq_len, device=device).unsqueeze(0) <= q_pos
