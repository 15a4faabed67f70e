"""A KV pool built to catch kernels that read the wrong slots, shared by the attention tests.

Sequence slots are scattered at random; every slot no sequence owns holds NaN (NaN scales in
an int8 pool); unused `req_to_token` entries (past each length, other rows) and the entries
of keys no query may see point at those poisoned slots. A kernel that reads any of them, or
leaves an output element unwritten, produces NaN.
"""

from __future__ import annotations

import torch

from engine.layers.attention import quantize_int8
from engine.worker.forward_context import INT8_KV_SCALE_DTYPE

NAN = float("nan")


class PoisonedPool:
    def __init__(
        self,
        gen: torch.Generator,
        seq_lens: list[int],
        num_unseen: list[int],  # per sequence: leading keys no query of it may see (sliding window)
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        int8: bool,
    ) -> None:
        num_seqs, max_len = len(seq_lens), max(seq_lens)
        num_slots = sum(seq_lens) + 64
        num_rows = num_seqs + 3
        kv_shape = (num_slots + 1, num_kv_heads, head_dim)
        k = torch.randn(kv_shape, generator=gen)
        v = torch.randn(kv_shape, generator=gen)
        free = torch.randperm(num_slots, generator=gen)
        poison = free[sum(seq_lens) :]  # never used by a sequence
        self.req_to_token = poison[torch.randint(0, len(poison), (num_rows, max_len + 5), generator=gen)].int()
        self.req_indices = torch.randperm(num_rows, generator=gen)[:num_seqs]
        used = 0
        for i, (length, unseen) in enumerate(zip(seq_lens, num_unseen, strict=True)):
            slots = free[used : used + length]
            used += length
            slots[:unseen] = poison[torch.randint(0, len(poison), (unseen,), generator=gen)]
            self.req_to_token[self.req_indices[i], :length] = slots.int()
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if int8:
            self.k_pool, self.k_scale = quantize_int8(k, INT8_KV_SCALE_DTYPE)
            self.v_pool, self.v_scale = quantize_int8(v, INT8_KV_SCALE_DTYPE)
            self.k_scale[poison], self.v_scale[poison] = NAN, NAN
        else:
            k[poison], v[poison] = NAN, NAN
            self.k_pool, self.v_pool = k.to(dtype), v.to(dtype)

    def run(self, **kwargs: object) -> torch.Tensor:
        raise NotImplementedError  # the kernel under test, in each test module's subclass

    def reference(self) -> torch.Tensor:
        raise NotImplementedError

    def assert_tiny_scales_kept(self, **run_kwargs: object) -> None:
        """An int8 pool with its scales times 1e-6, far below fp16's smallest normal number: the
        kernel's output, in units of the scales, still matches the reference."""
        assert self.k_scale is not None and self.v_scale is not None
        self.k_scale *= 1e-6
        self.v_scale *= 1e-6
        out, reference = self.run(**run_kwargs), self.reference()
        assert reference.abs().max() < 1e-2  # the outputs are of the scales' size
        torch.testing.assert_close(out.float() / 1e-6, reference.float() / 1e-6, atol=2e-2, rtol=2e-2)

    def to(self, device: str) -> PoisonedPool:
        """Moves every tensor attribute (those of subclasses too) to `device`."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self
