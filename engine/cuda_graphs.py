"""CUDA graphs for decode steps: one captured forward pass per batch-size bucket.

A decode step (every sequence computes one token and samples the next) launches a few
hundred small kernels; at small batches their launch cost, not the GPU, sets the step time.
`DecodeGraphs` captures the whole step (embedding, every layer, final norm and LM head) once
per bucket of batch sizes at start-up and replays it: one launch per step.

Everything a captured step reads lives in static device buffers, written before each replay
with one host-to-device copy from a pinned staging buffer:

    row 0: input ids   row 1: positions   row 2: req_to_token rows   row 3: seq lens
    row 4: KV slots of the new tokens

An input id < 0 is a placeholder for the token the previous step sampled for that row (an
overlapped step is planned before its input is known): the graph reads it from `last_sampled`.

A batch of n sequences runs in the smallest bucket >= n; the padding rows compute token 0 at
position 0 with no keys (seq len 0, so attention reads nothing) and store their K/V in the
pool's dummy slot. The decode attention launch is captured with a fixed number of splits per
sequence (`graph_num_splits`): each sequence cuts its own keys into that many pieces on the
device, so one graph serves every length up to max_model_len.

Only the Triton backend is captured (its kernels read lengths from the device; the torch path
sizes tensors from host values). Steps that need more (prefill chunks, prompt logprobs,
more sequences than the largest bucket) run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.forward_context import ForwardContext, KVPool, set_forward_context

logger = logging.getLogger(__name__)

_IDS, _POS, _ROWS, _LENS, _SLOTS = range(5)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `max_batch` (which is always the last bucket)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch]
    buckets += list(range(16, max_batch, 16))
    return sorted({*buckets, max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVPool,
        req_to_token: torch.Tensor,
        last_sampled: torch.Tensor,
        max_batch: int,
        max_model_len: int,
        vocab_size: int,
    ) -> None:
        self.model = model
        self.kv = kv
        self.req_to_token = req_to_token
        self.last_sampled = last_sampled  # [rows]: a placeholder input id (< 0) reads its row's entry
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        device = req_to_token.device
        self._host = torch.zeros((5, self.max_batch), dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()
        self._static = torch.zeros((5, self.max_batch), dtype=torch.int64, device=device)
        self._ones = torch.ones(self.max_batch, dtype=torch.int64, device=device)
        self._cu = torch.arange(self.max_batch + 1, dtype=torch.int64, device=device)
        # One logits buffer for every bucket: each graph writes its rows into it.
        self.logits = torch.empty((self.max_batch, vocab_size), dtype=torch.float32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._copied = torch.cuda.Event()  # the last staging copy has left the pinned buffer
        self._pad_defaults()

    def _pad_defaults(self) -> None:
        h = self._host_np
        h[: _LENS + 1] = 0
        h[_SLOTS] = self.kv.dummy_slot

    def _context(self, bs: int) -> ForwardContext:
        from engine.kernels.decode_attention import graph_num_splits  # imports triton

        s = self._static
        return ForwardContext(
            kv=self.kv,
            req_to_token=self.req_to_token,
            req_indices=s[_ROWS, :bs],
            start_pos=s[_POS, :bs],
            new_lens=self._ones[:bs],
            seq_lens=s[_LENS, :bs],
            cu_new_lens=self._cu[: bs + 1],
            out_slots=s[_SLOTS, :bs],
            positions=s[_POS, :bs],
            start_pos_list=[0] * bs,
            new_lens_list=[1] * bs,
            req_indices_list=[0] * bs,
            is_decode_only=True,
            max_seq_len=self.max_model_len,
            decode_num_splits=graph_num_splits(
                self.req_to_token.device, bs, self.kv.k[0].shape[1], self.max_model_len
            ),
        )

    def _forward(self, bs: int) -> None:
        ids = self._static[_IDS, :bs]
        ids = torch.where(ids < 0, self.last_sampled[self._static[_ROWS, :bs]], ids)
        hidden = self.model(ids, self._static[_POS, :bs])
        self.logits[:bs].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        self._pad_defaults()
        self._static.copy_(self._host)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):
            with set_forward_context(self._context(bs)):
                for _ in range(2):  # compile the kernels and set up cuBLAS outside the capture
                    self._forward(bs)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(bs)
            self._graphs[bs] = graph
        torch.cuda.synchronize()
        used = free_before - torch.cuda.mem_get_info()[0]
        logger.info(
            "CUDA graphs: %d decode batch sizes (1..%d) captured in %.1f s, %.2f GiB",
            len(self.buckets), self.max_batch, time.perf_counter() - start, used / (1 << 30),
        )

    def can_run(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.max_batch and bool(self._graphs)

    def run(
        self, input_ids: list[int], positions: list[int], rows: list[int], slots: list[int]
    ) -> torch.Tensor:
        """One decode step of len(input_ids) sequences -> logits [n, vocab] float32.

        positions[i] is the position of sequence i's new token, so its seq len is positions[i] + 1.
        The returned tensor is a view of the shared buffer: read it before the next replay.
        """
        n = len(input_ids)
        bs = next(b for b in self.buckets if b >= n)
        self._copied.synchronize()  # (a rank that does not sample never waits for its step)
        h = self._host_np
        h[_IDS, :n] = input_ids
        h[_POS, :n] = positions
        h[_ROWS, :n] = rows
        h[_LENS, :n] = positions
        h[_LENS, :n] += 1
        h[_SLOTS, :n] = slots
        if bs > n:  # the rows of an earlier, larger step: back to padding
            h[: _LENS + 1, n:bs] = 0
            h[_SLOTS, n:bs] = self.kv.dummy_slot
        self._static.copy_(self._host, non_blocking=True)
        self._copied.record()
        self._graphs[bs].replay()
        return self.logits[:n]

