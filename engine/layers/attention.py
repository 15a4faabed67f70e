"""Attention over the token-granular KV pool (plain torch; the CPU path and the reference).

Data flow of one layer in one step (see `engine/forward_context.py`):
1. store: the new tokens' k/v [T, KV, D] go to `kv.k[layer][out_slots]` / `kv.v[...]`;
   with an int8 pool they are quantized first (symmetric, one scale per slot and kv head,
   scale = absmax / 127 rounded to the pool's scale dtype, values rounded to the nearest
   step of that scale) and the scales go to `kv.k_scale[layer][out_slots]`.
2. read: sequence i's keys are the slots `req_to_token[row_i, :seq_len_i]` (cached prefix
   plus the tokens just stored), dequantized when int8.
3. attend: new token j of sequence i sits at position start_pos_i + j and sees keys at
   positions <= its own (causal), and with a sliding window W only keys with
   position > its own - W. With ALiBi slopes (BLOOM, `engine/layers/alibi.py`) head h adds
   slope_h * (key position - query position) to its scores.

Decode-only steps gather every sequence's keys into one padded [B, L] batch and mask the
padding, instead of looping over sequences in Python.
GQA: query head h reads kv head h // G, G = H / KV. A decode step folds the G query heads of
a kv head into G query rows of that kv head ([B, KV, G, D]): plain attention with KV heads
and no key repeat. On the CPU this is several times faster than `enable_gqa` with one query
row, bf16 most of all (docs/benchmarks.md, "CPU, offline"), with the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_decode
from engine.layers.alibi import alibi_bias
from engine.layers.backend import use_triton
from engine.worker.forward_context import INT8_KV_SCALE_DTYPE, ForwardContext, KVPool, get_forward_context

_INT8_MAX = 127.0


def quantize_int8(
    x: torch.Tensor, scale_dtype: torch.dtype = INT8_KV_SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, KV, D] float -> (int8 [T, KV, D], scale [T, KV] in `scale_dtype`); x ~= q * scale.

    The scale is rounded to `scale_dtype` before the values are divided by it, so the stored
    pair dequantizes with an error of at most about half a step per element, whatever the
    precision of the scale (an absmax element that lands just past 127 is clamped).
    """
    scale = (x.abs().amax(dim=-1).float() / _INT8_MAX).clamp(min=1e-8)  # an all-zero head: zeros, not NaN
    scale = scale.to(scale_dtype)
    q = torch.round(x.float() / scale.float().unsqueeze(-1)).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q: [..., KV, D] int8, scale: [..., KV] -> [..., KV, D] in `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        layer_idx: int,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        # ALiBi: this rank's heads' slopes, [num_heads] float32 on the model's device (a buffer,
        # not a parameter: no checkpoint holds it). Layers may share one tensor.
        self.alibi_slopes: torch.Tensor | None
        if alibi_slopes is not None:
            if tuple(alibi_slopes.shape) != (num_heads,):
                raise ValueError(f"alibi_slopes must be [{num_heads}], got {tuple(alibi_slopes.shape)}")
            alibi_slopes = alibi_slopes.to(torch.get_default_device(), torch.float32)
            self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        else:
            self.alibi_slopes = None
        # The kernels take power-of-two head sizes; other models keep the torch path on CUDA too.
        self._kernel_head_dim = head_dim >= 16 and head_dim & (head_dim - 1) == 0
        # Decode steps over a float32 pool on the CPU take the C++ op (engine.kernels.cpu_decode):
        # chosen per model at load (engine.models.cpu_decode_layer.enable_cpu_kernels)
        self.cpu_kernels = False

    # ---- KV pool access -------------------------------------------------------------------

    def _store(self, kv: KVPool, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [T]; k, v: [T, KV, D]
        k_pool, v_pool = kv.k[self.layer_idx], kv.v[self.layer_idx]
        if kv.k_scale is not None and kv.v_scale is not None:
            k_scale, v_scale = kv.k_scale[self.layer_idx], kv.v_scale[self.layer_idx]
            kq, ks = quantize_int8(k, k_scale.dtype)
            vq, vs = quantize_int8(v, v_scale.dtype)
            k_pool.index_copy_(0, slots, kq)
            v_pool.index_copy_(0, slots, vq)
            k_scale.index_copy_(0, slots, ks)
            v_scale.index_copy_(0, slots, vs)
        else:
            k_pool.index_copy_(0, slots, k.to(k_pool.dtype))
            v_pool.index_copy_(0, slots, v.to(v_pool.dtype))

    def _read(self, kv: KVPool, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # slots: any shape S -> k, v: [*S, KV, D] in `dtype`
        k_pool, v_pool, flat = kv.k[self.layer_idx], kv.v[self.layer_idx], slots.reshape(-1)
        k = k_pool.index_select(0, flat).view(*slots.shape, *k_pool.shape[1:])
        v = v_pool.index_select(0, flat).view(*slots.shape, *v_pool.shape[1:])
        if kv.k_scale is not None and kv.v_scale is not None:
            k = dequantize_int8(k, kv.k_scale[self.layer_idx][slots], dtype)
            v = dequantize_int8(v, kv.v_scale[self.layer_idx][slots], dtype)
        return k.to(dtype), v.to(dtype)

    # ---- forward --------------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H * D], k / v: [T, KV * D] -> [T, H * D]
        ctx = get_forward_context()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        if self._kernel_head_dim and q.is_cuda and use_triton():
            return self._forward_triton(ctx, q, k, v).reshape(num_tokens, self.num_heads * self.head_dim)
        self._store(
            ctx.kv,
            ctx.out_slots,
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
        )
        if ctx.is_decode_only:
            out = self._decode(ctx, q)
        else:
            out = self._per_sequence(ctx, q, k, v)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _forward_triton(
        self, ctx: ForwardContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        from engine.kernels.kv_store import store_kv

        kv, layer = ctx.kv, self.layer_idx
        k_scale = kv.k_scale[layer] if kv.k_scale is not None else None
        v_scale = kv.v_scale[layer] if kv.v_scale is not None else None
        num_tokens = q.shape[0]
        store_kv(
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            kv.k[layer], kv.v[layer], ctx.out_slots, k_scale, v_scale,
        )
        return triton_attention(
            ctx, q, kv.k[layer], kv.v[layer], self.scale, sliding_window=self.sliding_window, k_scale=k_scale,
            v_scale=v_scale, alibi_slopes=self.alibi_slopes,
        )

    def _per_sequence(
        self, ctx: ForwardContext, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> torch.Tensor:
        # q: [T, H, D]; k_new / v_new: [T, KV * D], this step's keys and values (already stored)
        out = torch.empty_like(q)  # [T, H, D]
        # A sequence without a cached prefix attends to exactly this step's k / v: no need to
        # read them back, when the pool holds them unchanged (same dtype, not int8).
        pool_is_exact = ctx.kv.k_scale is None and ctx.kv.k[self.layer_idx].dtype == q.dtype
        group = self.num_heads // self.num_kv_heads
        offset = 0
        for row, start, num_new in zip(
            ctx.req_indices_list, ctx.start_pos_list, ctx.new_lens_list, strict=True
        ):
            seq_len = start + num_new
            if start == 0 and pool_is_exact:
                k = k_new[offset : offset + num_new].view(num_new, self.num_kv_heads, self.head_dim)
                v = v_new[offset : offset + num_new].view(num_new, self.num_kv_heads, self.head_dim)
            else:
                slots = ctx.req_to_token[row, :seq_len].long()
                k, v = self._read(ctx.kv, slots, q.dtype)  # [L, KV, D]
            mask = self._mask(start, num_new, seq_len, q.device, q.dtype)
            if num_new == 1:  # a decoding sequence in a mixed step: fold the heads as in _decode
                q_i = q[offset].view(1, self.num_kv_heads, group, self.head_dim)  # [1, KV, G, D]
                gqa = False
                if mask is not None and mask.dim() == 3:  # ALiBi's [H, 1, L], folded the same way
                    mask = mask.view(self.num_kv_heads, group, seq_len)
            else:
                q_i = q[offset : offset + num_new].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
                gqa = True
            o = F.scaled_dot_product_attention(
                q_i,
                k.transpose(0, 1).unsqueeze(0),  # [1, KV, L, D]
                v.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None and num_new > 1,
                scale=self.scale,
                enable_gqa=gqa,
            )  # [1, H, n, D], or [1, KV, G, D] for one token
            out[offset : offset + num_new] = o.reshape(-1, num_new, self.head_dim).transpose(0, 1)
            offset += num_new
        return out

    def _mask(
        self, start: int, num_new: int, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Boolean [n, L] mask (True = attend), or None when plain causal or no mask suffices;
        with ALiBi the additive [H, n, L] bias in `dtype` (-inf where a key is not seen)."""
        window = self.sliding_window if self.sliding_window is not None and seq_len > self.sliding_window else None
        if (start == 0 or num_new == 1) and window is None and self.alibi_slopes is None:
            return None  # is_causal (n == L) or a single token that sees everything
        q_pos = torch.arange(start, seq_len, device=device).unsqueeze(1)  # [n, 1]
        k_pos = torch.arange(seq_len, device=device).unsqueeze(0)  # [1, L]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        if self.alibi_slopes is not None:
            return alibi_bias(self.alibi_slopes, q_pos, k_pos, mask, dtype)
        return mask

    def _decode(self, ctx: ForwardContext, q: torch.Tensor) -> torch.Tensor:
        # One new token per sequence: q [B, H, D]. Keys are gathered into a padded [B, L] grid,
        # or on the CPU read in place by one C++ op (float32 pools, no ALiBi).
        num_seqs = q.shape[0]
        kv = ctx.kv
        if self.cpu_kernels and kv.k_scale is None and self.alibi_slopes is None and q.dtype == torch.float32:
            k_pool, v_pool = kv.k[self.layer_idx], kv.v[self.layer_idx]
            if k_pool.dtype == torch.float32 and not q.is_cuda:
                return cpu_decode.decode_attention(
                    q, k_pool, v_pool, ctx.req_to_token, ctx.req_indices, ctx.seq_lens, self.scale, self.sliding_window
                )
        group = self.num_heads // self.num_kv_heads
        slots, bias = self._decode_grid(ctx, q.dtype)
        if self.alibi_slopes is not None:
            bias = self._decode_alibi(ctx, self.alibi_slopes, bias, q.dtype)
        k, v = self._read(ctx.kv, slots, q.dtype)  # [B, L, KV, D]
        o = F.scaled_dot_product_attention(
            q.view(num_seqs, self.num_kv_heads, group, self.head_dim),  # [B, KV, G, D]: heads of one kv head
            k.transpose(1, 2),  # [B, KV, L, D]
            v.transpose(1, 2),
            attn_mask=bias,  # [B, 1, 1, L]; with ALiBi [B, KV, G, L]
            scale=self.scale,
        )  # [B, KV, G, D]
        return o.reshape(num_seqs, self.num_heads, self.head_dim)

    def _decode_grid(
        self, ctx: ForwardContext, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return decode_grid(ctx, self.sliding_window, dtype)

    def _decode_alibi(
        self, ctx: ForwardContext, slopes: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """The decode grid's additive mask [B, 1, 1, L] (or None) plus each head's ALiBi bias
        against the query at position seq_len - 1: [B, KV, G, L] in `dtype`. Computed once per
        step for the layers that share the slopes tensor."""
        key = ("decode_alibi", self.sliding_window, dtype, slopes.data_ptr())
        cached = ctx.derived.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        k_pos = torch.arange(ctx.max_seq_len, device=slopes.device).view(1, 1, -1)  # [1, 1, L]
        q_pos = (ctx.seq_lens.to(slopes.device) - 1).view(-1, 1, 1)  # [B, 1, 1]
        bias = alibi_bias(slopes, q_pos, k_pos, None, dtype)  # [B, H, 1, L]
        if mask is not None:
            bias = bias + mask
        group = self.num_heads // self.num_kv_heads
        bias = bias.view(bias.shape[0], self.num_kv_heads, group, ctx.max_seq_len)
        ctx.derived[key] = bias
        return bias

    def extra_repr(self) -> str:
        alibi = "" if self.alibi_slopes is None else ", alibi"
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"layer={self.layer_idx}, sliding_window={self.sliding_window}{alibi}"
        )


def decode_grid(
    ctx: ForwardContext, sliding_window: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decode-only step's padded slot ids [B, L] and an additive mask [B, 1, 1, L] in `dtype`
    (0 where a key is seen, -inf on padding and outside the window; None when every key is
    seen). Computed once per step, window and dtype, for every layer."""
    key = ("decode_grid", sliding_window, dtype)
    cached = ctx.derived.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    max_len = ctx.max_seq_len
    windowed = sliding_window is not None and max_len > sliding_window
    slots = ctx.req_to_token[ctx.req_indices, :max_len].long()  # [B, L]
    bias: torch.Tensor | None = None
    if ctx.num_seqs > 1 or windowed:
        seq_lens = ctx.seq_lens  # [B]
        k_pos = torch.arange(max_len, device=seq_lens.device).unsqueeze(0)  # [1, L]
        valid = k_pos < seq_lens.unsqueeze(1)  # [B, L]
        if sliding_window is not None:
            valid &= k_pos > (seq_lens - 1 - sliding_window).unsqueeze(1)
        # Padding entries may hold stale slot ids: point them at the dummy slot.
        slots = torch.where(valid, slots, ctx.kv.dummy_slot)
        # Every row sees at least its own token, so no row is all -inf.
        bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
        bias = bias.masked_fill_(~valid, float("-inf"))[:, None, None, :]
    ctx.derived[key] = (slots, bias)
    return slots, bias


def triton_attention(
    ctx: ForwardContext,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's attention of a step through the Triton kernels, the new K/V already stored.

    q: [T, H, D] -> [T, H, D]; `alibi_slopes`: [H] float32, ALiBi's per-head slopes, or None.
    A decode-only step takes the decode kernel. A packed step takes the prefill kernel, except
    its leading one-token sequences (`ctx.decode_rows`): the decode kernel reads each of their
    keys once per kv head for the whole query group, where the prefill kernel would compute a
    query tile per head (BLOCK_M rows, one of them real).
    """
    from engine.kernels.decode_attention import decode_attention
    from engine.kernels.prefill_attention import prefill_attention

    if ctx.is_decode_only:
        return decode_attention(
            q, k_pool, v_pool, ctx.req_to_token, ctx.req_indices, ctx.seq_lens, scale,
            sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes,
            max_seq_len=ctx.max_seq_len, num_splits=ctx.decode_num_splits,
        )
    graphed = ctx.prefill_tiles is not None
    # A graphed step's padding rows (and its rows of sequences that are neither) get zeros.
    out = torch.zeros_like(q) if graphed else torch.empty_like(q)
    first = 0  # the first sequence of the prefill launch
    if ctx.decode_rows:
        assert ctx.decode_seq_lens is not None
        rows = ctx.decode_rows
        # Rows of a graphed launch that are not decodes have length 0: they get zeros here and
        # their values from the prefill launch after it (its tiles cover only those sequences).
        decode_attention(
            q[:rows], k_pool, v_pool, ctx.req_to_token, ctx.req_indices[:rows], ctx.decode_seq_lens, scale,
            out[:rows], sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes,
            max_seq_len=ctx.max_seq_len, num_splits=ctx.decode_num_splits,
        )
        if not graphed:
            first = rows
    if graphed:
        return prefill_attention(
            q, k_pool, v_pool, ctx.req_to_token, ctx.req_indices, ctx.start_pos, ctx.cu_new_lens, scale, out,
            sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes,
            tiles=ctx.prefill_tiles,
        )
    req_indices, start_pos, cu_new_lens = _prefill_part(ctx, first)
    return prefill_attention(
        q, k_pool, v_pool, ctx.req_to_token, req_indices, start_pos, cu_new_lens, scale, out,
        sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes,
        max_new_len=max(ctx.new_lens_list[first:]),
    )


def _prefill_part(ctx: ForwardContext, first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`req_indices`, `start_pos` and `cu_new_lens` of the sequences from `first` on: the
    context's own tensors when `first` is 0, else copies made once per step into tensors of
    their own: a slice at an odd offset is not 16-byte aligned, and Triton compiles a kernel
    variant per pointer alignment (in the middle of serving, the first time a step needs it)."""
    if not first:
        return ctx.req_indices, ctx.start_pos, ctx.cu_new_lens
    part = ctx.derived.get("prefill_part")
    if part is None:
        part = ctx.derived["prefill_part"] = tuple(
            t[first:].clone() for t in (ctx.req_indices, ctx.start_pos, ctx.cu_new_lens)
        )
    return part  # type: ignore[return-value]
