"""CUDA graphs: decode steps by batch-size bucket, packed (prefill) steps by token-count bucket.

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
sizes tensors from host values).

`PrefillGraphs` does the same for the packed part of a step (prefill chunks, and decodes that
need more than the decode graph gives, such as prompt logprobs): one captured pass of the
model body (no LM head) per bucket of token counts, up to `max_prefill_graph_tokens`. Eager,
such a pass launches ~15 kernels per layer from Python, which takes longer than the GPU
needs for a few hundred tokens; past about 2048 tokens the GPU is the bound either way, and
those steps run eagerly. Its static buffers hold, per token: input id, position, KV slot,
row (for placeholders); per sequence (up to max_num_seqs): row, start, new length, seq len,
the packed offsets and the seq len of a leading decode (0 for the others); and the prefill
attention's tile table, whose fixed length makes the attention launch the same for every step
of the bucket. The step's leading one-token sequences (the running decodes, which the
scheduler puts first) take a decode attention launch sized for the bucket; the rest take the
tiles. Padding tokens compute token 0 at position 0 into the dummy slot and belong to no
sequence (attention gives them zeros); padding sequences have no new tokens and no tiles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.worker.forward_context import ForwardContext, KVPool, leading_decodes, set_forward_context

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from engine.messages import SeqStep
    from engine.models.causal_lm import CausalLM

_IDS, _POS, _ROWS, _LENS, _SLOTS, _ROPE = range(6)
# PrefillGraphs' per-token and per-sequence rows of the static buffers.
_T_IDS, _T_POS, _T_SLOTS, _T_ROWS = range(4)
_S_ROWS, _S_START, _S_NEW, _S_SEQ_LEN, _S_CU, _S_DECODE_LEN = range(6)
_MAX_PARTIAL_TILES = 32


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `max_batch` (which is always the last bucket)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch]
    buckets += list(range(16, max_batch, 16))
    return sorted({*buckets, max_batch})


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then every 128 up to 1024 and every 256 past it, up to `max_tokens`
    (always the last bucket): a step pads at most 2x below 128 tokens, at most 25 % above."""
    buckets = [b for b in (16, 32, 64) if b < max_tokens]
    buckets += [b for b in range(128, min(max_tokens, 1024), 128)]
    buckets += [b for b in range(1024, max_tokens, 256)]
    return sorted({*buckets, max_tokens})


@torch.inference_mode()
def capture_buckets(
    buckets: list[int],
    context: Callable[[int], ForwardContext],
    forward: Callable[[int], None],
    what: str,
) -> dict[int, torch.cuda.CUDAGraph]:
    """One graph of `forward(b)` under `context(b)` per bucket b, largest first so the smaller
    ones reuse its memory pool (one pool per call); logs the time and memory it took."""
    start = time.perf_counter()
    free_before = torch.cuda.mem_get_info()[0]
    pool = torch.cuda.graph_pool_handle()
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    for b in reversed(buckets):
        with set_forward_context(context(b)):
            for _ in range(2):  # compile the kernels and set up cuBLAS outside the capture
                forward(b)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                forward(b)
        graphs[b] = graph
    torch.cuda.synchronize()
    used = free_before - torch.cuda.mem_get_info()[0]
    logger.info(
        "CUDA graphs: %d %s (%d..%d) captured in %.1f s, %.2f GiB",
        len(buckets), what, buckets[0], buckets[-1], time.perf_counter() - start, used / (1 << 30),
    )
    return graphs


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
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
        # An M-RoPE model's rotary positions (row 5) may differ from the token positions (row 1).
        self._rope_row = _ROPE if getattr(model, "mrope", False) else _POS
        self._host = torch.zeros((6, self.max_batch), dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()
        self._static = torch.zeros((6, self.max_batch), dtype=torch.int64, device=device)
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
        hidden = self.model(ids, self._static[self._rope_row, :bs])
        self.logits[:bs].copy_(self.model.compute_logits(hidden))

    def capture(self) -> None:
        self._pad_defaults()
        self._static.copy_(self._host)
        self._graphs = capture_buckets(self.buckets, self._context, self._forward, "decode batch sizes")

    def can_run(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.max_batch and bool(self._graphs)

    def run(
        self, input_ids: list[int], positions: list[int], rows: list[int], slots: list[int],
        rope_positions: Sequence[int] | np.ndarray | None = None,
    ) -> torch.Tensor:
        """One decode step of len(input_ids) sequences -> logits [n, vocab] float32.

        positions[i] is the position of sequence i's new token, so its seq len is positions[i] + 1;
        `rope_positions`, an M-RoPE model's rotary positions where they differ (else `positions`).
        The returned tensor is a view of the shared buffer: read it before the next replay.
        """
        n = len(input_ids)
        bs = next(b for b in self.buckets if b >= n)
        self._copied.synchronize()  # the previous step's staging copy: long done when it launched
        h = self._host_np
        h[_IDS, :n] = input_ids
        h[_POS, :n] = positions
        h[_ROWS, :n] = rows
        h[_LENS, :n] = positions
        h[_LENS, :n] += 1
        h[_SLOTS, :n] = slots
        if self._rope_row == _ROPE:
            h[_ROPE, :n] = positions if rope_positions is None else rope_positions
        if bs > n:  # the rows of an earlier, larger step: back to padding
            h[: _LENS + 1, n:bs] = 0
            h[_SLOTS, n:bs] = self.kv.dummy_slot
            h[_ROPE, n:bs] = 0
        self._static.copy_(self._host, non_blocking=True)
        self._copied.record()
        self._graphs[bs].replay()
        return self.logits[:n]



class PrefillGraphs:
    """Packed steps of up to `max_tokens` tokens in up to `max_seqs` sequences, by token bucket."""

    def __init__(
        self,
        model: CausalLM,
        kv: KVPool,
        req_to_token: torch.Tensor,
        last_sampled: torch.Tensor,
        max_tokens: int,
        max_seqs: int,
        max_model_len: int,
    ) -> None:
        from engine.kernels.prefill_attention import max_prefill_tiles, prefill_block_m  # imports triton

        self.model = model
        self.kv = kv
        self.req_to_token = req_to_token
        self.last_sampled = last_sampled
        self.max_model_len = max_model_len
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        self.max_seqs = max_seqs
        device = req_to_token.device
        self.block_m = prefill_block_m(device)
        # Each table has room for the bucket's full query blocks plus one partial block for up to
        # _MAX_PARTIAL_TILES sequences: a step with more sequences than that (many one-token
        # rows) takes a larger bucket, or runs eagerly. Every entry is a program of the
        # attention launch, most of which exit at once: a table sized for max_num_seqs
        # sequences launched ~8 000 of them per layer for a typical 512-token step.
        self._num_tiles = {
            t: max_prefill_tiles(t, min(max_seqs, _MAX_PARTIAL_TILES), self.block_m) for t in self.buckets
        }
        max_tiles = self._num_tiles[self.max_tokens]
        # Two pinned staging buffers, used in turn, and one device buffer, copied whole (tens of
        # KiB) per step. Staging waits for the copy out of its buffer two steps back: in a step
        # that also replays a decode graph, the previous step's copy comes after that step's
        # decode graph on the stream, and waiting for it would hold the host (launching ahead)
        # until the graph is done.
        sizes = (4 * self.max_tokens, 6 * (max_seqs + 1), 2 * max_tiles)
        on_gpu = device.type == "cuda"
        self._hosts = [torch.zeros(sum(sizes), dtype=torch.int64, pin_memory=on_gpu) for _ in range(2)]
        self._copied = [torch.cuda.Event() for _ in self._hosts] if on_gpu else None
        a, b = sizes[0], sizes[0] + sizes[1]
        self._views = [
            (h[:a].reshape(4, self.max_tokens), h[a:b].reshape(6, max_seqs + 1), h[b:].reshape(2, max_tiles))
            for h in (host.numpy() for host in self._hosts)
        ]
        self._use_buffer(0)
        self._static = torch.zeros(sum(sizes), dtype=torch.int64, device=device)
        self._tok = self._static[:a].view(4, self.max_tokens)
        self._seq = self._static[a:b].view(6, max_seqs + 1)
        self._tiles = self._static[b:].view(2, max_tiles)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Every bucket's graph copies its output here (one buffer outside the graphs' pool,
        # instead of each bucket's output held in the pool): [max_tokens, hidden_size].
        self._hidden: torch.Tensor | None = None
        self._pad_defaults()

    def _use_buffer(self, turn: int) -> None:
        """Stage into host buffer `turn` (0 or 1) from now on."""
        self._turn = turn
        self._host = self._hosts[turn]
        self._tok_np, self._seq_np, self._tiles_np = self._views[turn]

    def _pad_defaults(self) -> None:
        self._tok_np[:] = 0
        self._tok_np[_T_SLOTS] = self.kv.dummy_slot
        self._seq_np[:] = 0
        self._tiles_np[0] = -1
        self._tiles_np[1] = 0

    def decode_rows(self, num_tokens: int) -> int:
        """Rows of the decode attention launch in the graph of bucket `num_tokens`: room for a
        step whose tokens are all decodes."""
        return min(num_tokens, self.max_seqs)

    def _context(self, num_tokens: int) -> ForwardContext:
        from engine.kernels.decode_attention import graph_num_splits  # imports triton

        tok, seq, n = self._tok, self._seq, self.max_seqs
        decode_rows = self.decode_rows(num_tokens)
        return ForwardContext(
            kv=self.kv,
            req_to_token=self.req_to_token,
            req_indices=seq[_S_ROWS, :n],
            start_pos=seq[_S_START, :n],
            new_lens=seq[_S_NEW, :n],
            seq_lens=seq[_S_SEQ_LEN, :n],
            cu_new_lens=seq[_S_CU, : n + 1],
            out_slots=tok[_T_SLOTS, :num_tokens],
            positions=tok[_T_POS, :num_tokens],
            start_pos_list=[0] * n,
            new_lens_list=[0] * n,
            req_indices_list=[0] * n,
            is_decode_only=False,
            max_seq_len=self.max_model_len,
            decode_num_splits=graph_num_splits(
                self.req_to_token.device, decode_rows, self.kv.k[0].shape[1], self.max_model_len
            ),
            prefill_tiles=self._tiles[:, : self._num_tiles[num_tokens]],
            decode_rows=decode_rows,
            decode_seq_lens=seq[_S_DECODE_LEN, :decode_rows],
        )

    def _forward(self, num_tokens: int) -> None:
        ids = self._tok[_T_IDS, :num_tokens]
        ids = torch.where(ids < 0, self.last_sampled[self._tok[_T_ROWS, :num_tokens]], ids)
        hidden = self.model(ids, self._tok[_T_POS, :num_tokens])
        if self._hidden is None:  # the first warm-up pass (the largest bucket), before any capture
            self._hidden = torch.empty((self.max_tokens, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
        self._hidden[:num_tokens].copy_(hidden)

    def capture(self) -> None:
        self._pad_defaults()
        self._static.copy_(self._host)
        self._graphs = capture_buckets(self.buckets, self._context, self._forward, "prefill token counts")

    def bucket_for(self, seqs: Sequence[SeqStep]) -> int | None:
        """The smallest captured bucket that holds the step's tokens and its attention tiles, or
        None (run it eagerly)."""
        if not self._graphs or not 0 < len(seqs) <= self.max_seqs:
            return None
        new_lens = [len(s.token_ids) for s in seqs]
        num_tokens = sum(new_lens)
        tiles = sum(-(-n // self.block_m) for n in new_lens[leading_decodes(new_lens) :])
        return next((b for b in self.buckets if b >= num_tokens and self._num_tiles[b] >= tiles), None)

    def run(self, seqs: Sequence[SeqStep], bucket: int, rope_positions: np.ndarray | None = None) -> torch.Tensor:
        """The model body over `seqs` packed, replayed in `bucket` (from `bucket_for`) ->
        hidden [num_tokens, hidden_size], a view of the graphs' output buffer: read it (in
        stream order) before the next replay. `rope_positions` [num_tokens]: an M-RoPE model's
        rotary positions where they differ from the token positions (no image token here)."""
        assert self._copied is not None
        self._use_buffer(self._turn ^ 1)
        self._copied[self._turn].synchronize()  # its copy two steps back
        num_tokens = self._stage(seqs, bucket)
        if rope_positions is not None:  # (the attention reads the token positions from the starts)
            self._tok_np[_T_POS, :num_tokens] = rope_positions
        self._static.copy_(self._host, non_blocking=True)
        self._copied[self._turn].record()
        self._graphs[bucket].replay()
        assert self._hidden is not None
        return self._hidden[:num_tokens]

    def _stage(self, seqs: Sequence[SeqStep], bucket: int) -> int:
        """Write the step into the host staging buffer for `bucket` -> its number of tokens."""
        from engine.kernels.prefill_attention import prefill_tiles

        new_lens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=len(seqs))
        num_tokens, n = int(new_lens.sum()), len(seqs)
        self._pad_defaults()
        tok, seq = self._tok_np, self._seq_np
        tok[_T_IDS, :num_tokens] = [t for s in seqs for t in s.token_ids]
        starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=n)
        cu = np.cumsum(new_lens)
        # positions: start_i + (index of the token within its sequence)
        tok[_T_POS, :num_tokens] = np.repeat(starts - (cu - new_lens), new_lens) + np.arange(num_tokens)
        tok[_T_SLOTS, :num_tokens] = [t for s in seqs for t in s.out_slots]
        rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=n)
        tok[_T_ROWS, :num_tokens] = np.repeat(rows, new_lens)
        seq[_S_ROWS, :n] = rows
        seq[_S_START, :n] = starts
        seq[_S_NEW, :n] = new_lens
        seq[_S_SEQ_LEN, :n] = starts + new_lens
        seq[_S_CU, 1 : n + 1] = cu
        seq[_S_CU, n + 1 :] = num_tokens  # padding sequences: empty, after the real ones
        # The leading one-token sequences take the decode launch (it has a row for each: the
        # bucket holds every token and max_seqs every sequence), the others the tiles.
        decodes = leading_decodes(new_lens.tolist())
        seq[_S_DECODE_LEN, :decodes] = seq[_S_SEQ_LEN, :decodes]
        tiled = new_lens.copy()
        tiled[:decodes] = 0
        prefill_tiles(tiled, self.block_m, self._tiles_np[:, : self._num_tiles[bucket]])
        return num_tokens
