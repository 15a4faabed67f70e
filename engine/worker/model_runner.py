"""The worker's side of a step: `req_to_token`, forward pass, sampling (the KV pool: kv_pool.py).

`ModelRunner.launch(plan)` writes the plan's slots into `req_to_token`, runs a step of plain
decodes through a CUDA graph (when there are graphs) and any other step as one padding-free
packed batch, samples the rows that reached their last known token, keeps those tokens on the device
for the next step's placeholders, and starts copying them to the host; the `PendingStep` it
returns gives only what the engine core needs (token ids and logprobs) once they are there.
On a GPU the worker launches the next step before waiting for those tokens, so the host's
work between two steps (reading the plan, the inputs of the next step, the result) runs while
the GPU computes (`execute(plan)`: both halves at once).

With tensor parallelism every rank runs this on the same plan: each holds its shard of the
weights and a KV pool of its own KV heads (the same number of slots on every rank); the
logits are gathered on every rank, every rank samples the same tokens, and only rank 0's
worker sends the result.

Constrained rows are masked by their grammars (engine/worker/grammar_masks.py): filled on the
host once the forward pass is queued and the previous tokens are in; applied last in the sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.config import EngineConfig
from engine.distributed import get_tp_rank, get_tp_size
from engine.distributed.parallel_state import all_reduce_min_int
from engine.layers.backend import use_triton
from engine.messages import NewRow, SeqStep, StepPlan, StepResult, WorkerInfo
from engine.model_config import ModelConfig
from engine.models.causal_lm import CausalLM
from engine.worker.forward_context import build_forward_context, set_forward_context
from engine.worker.grammar_masks import GrammarMasks
from engine.worker.image_inputs import ImageInputs
from engine.worker.kv_pool import KVLayout, kv_budget_bytes, profile_images_of
from engine.worker.pending_step import PendingStep
from engine.worker.sampler import Sampler, compute_prompt_logprobs
from engine.worker.sampling_state import SamplingState
from engine.worker.transfer import host_wait_allowed, to_device

if TYPE_CHECKING:
    from engine.worker.cuda_graphs import DecodeGraphs, PrefillGraphs

logger = logging.getLogger(__name__)

# A mixed step's decodes join its packed pass (`fuse_mixed_steps`) when their attention there (a
# program per (decode, kv head) over its whole context) fills the GPU: enough programs, or short
# contexts. Else (a few long contexts) they replay the decode graph, which splits each context.
_FUSED_MIN_DECODE_PROGRAMS = 512
_FUSED_MAX_SHORT_CONTEXT = 4096


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model: CausalLM, hf_config: object, grammar: GrammarMasks | None = None,
        model_path: str | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.device = config.resolved_device()
        shape = ModelConfig.from_hf_config(hf_config)
        self.num_layers = shape.num_layers
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        assert config.max_model_len is not None and config.max_num_seqs is not None, (
            "resolve the config before building a runner"
        )
        self.max_model_len = config.max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.kv_layout = KVLayout.for_model(shape, self.tp_size, config.kv_torch_dtype())
        self.num_kv_heads = self.kv_layout.num_kv_heads  # on this rank
        self.sampler = Sampler(seed=config.seed)
        images = partial(profile_images_of, model_path, hf_config, config.max_image_tokens_per_step)  # (model_path's)
        self.kv_budget_bytes = kv_budget_bytes(config, self.kv_layout, model, self.sampler, self._prefill_graph_tokens(), images)
        # The same slot indices are valid on every rank: the smallest pool any rank can hold.
        self.num_slots = all_reduce_min_int(self.kv_budget_bytes // self.kv_layout.bytes_per_token())
        if self.num_slots < 16:
            raise ValueError(f"KV cache budget of {self.kv_budget_bytes} bytes holds only {self.num_slots} tokens")
        self.kv = self.kv_layout.allocate(self.num_slots, self.device)
        # [max_num_seqs, max_model_len]: row r, position p -> KV slot. Unused entries point at the dummy.
        self.req_to_token = torch.full(
            (config.max_num_seqs, self.max_model_len), self.kv.dummy_slot, dtype=torch.int32, device=self.device
        )
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.states: dict[int, SamplingState] = {}
        self.prompts: dict[int, list[int]] = {}  # row -> prompt ids, for prompt logprobs
        # Its compiler is started by the worker once ready; without one (a model that ships no
        # tokenizer) a constrained row is refused.
        self.grammar = grammar if grammar is not None else GrammarMasks(self.device)
        self.constrained_rows: set[int] = set()  # rows whose state has a grammar: fill masks while any
        self.images = ImageInputs(model, self.device, config.max_image_tokens_per_step or 0)  # a VLM's, per row

        logger.info("%s", self.info().kv_cache_summary())
        # Row r's last sampled token, on the device: an overlapped step computes it before the
        # engine has seen it (the plan holds a placeholder, PLACEHOLDER_TOKEN, in its place).
        self.last_sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        if self._uses_graphs():
            from engine.worker.cuda_graphs import DecodeGraphs, PrefillGraphs  # imports triton

            self.graphs = DecodeGraphs(
                model, self.kv, self.req_to_token, self.last_sampled, config.max_num_seqs, self.max_model_len,
                shape.vocab_size,
            )
            self.graphs.capture()
            if self._prefill_graph_tokens() > 0:
                self.prefill_graphs = PrefillGraphs(
                    model, self.kv, self.req_to_token, self.last_sampled, self._prefill_graph_tokens(),
                    config.max_num_seqs, self.max_model_len,
                )
                self.prefill_graphs.capture()
        if self._triton_attention() and (config.fuse_mixed_steps or self.graphs is None):
            self._warm_up_mixed_steps()  # without graphs (enforce_eager) every step runs eagerly

    @torch.inference_mode()
    def _warm_up_mixed_steps(self) -> None:
        """Compile, at start-up, the decode attention launches of eager mixed steps (steps past
        the largest prefill graph, or every step without graphs: their running decodes take the
        decode kernel eagerly). Its number of splits S follows the step's longest context, and
        Triton compiles a variant for each way S and heads x S (a scratch stride) divide by 16 or
        equal 1: each would otherwise stall a step for seconds the first time serving needs it.
        Eight decodes at lengths that give S = 1, 2, 3, 4, 5, 7, 8, 17 at 64 keys per split and 16
        or more at 4 096 keys, and a two-token prompt, over the dummy slot (few rows: small scratch)."""
        if self.max_model_len < 2:
            return
        dummy = self.kv.dummy_slot
        decodes = min(self.max_num_seqs - 1, 8)
        for seq_len in sorted({min(n, self.max_model_len) for n in (1, 65, 129, 193, 257, 385, 512, 1025, 4096)}):
            seqs = [SeqStep(row=0, start_pos=seq_len - 1, token_ids=[0], out_slots=[dummy], sample=False)] * decodes
            seqs.append(SeqStep(row=0, start_pos=0, token_ids=[0, 0], out_slots=[dummy, dummy], sample=False))
            self._forward_eager(seqs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _triton_attention(self) -> bool:
        """Packed steps' attention takes the Triton kernels: the Triton backend on CUDA, for a
        model whose attention has them there (`CausalLM.triton_attention`)."""
        return self.device.startswith("cuda") and use_triton() and self.model.triton_attention

    def _uses_graphs(self) -> bool:
        """CUDA graphs are captured for the Triton backend on CUDA unless enforce_eager."""
        return self.device.startswith("cuda") and use_triton() and not self.config.enforce_eager

    def _prefill_graph_tokens(self) -> int:
        """Tokens of the largest packed step a prefill graph is captured for (0: none)."""
        if not (self._uses_graphs() and self.model.triton_attention):
            return 0
        return min(self.config.max_prefill_graph_tokens, self.config.max_num_batched_tokens or 0)

    def kv_capacity_ratio(self) -> float:
        """Tokens this pool holds over the tokens the same budget holds in the model dtype."""
        reference_slots = self.kv_budget_bytes // self.kv_layout.bytes_per_token(self.config.torch_dtype())
        return self.num_slots / max(reference_slots, 1)

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            num_slots=self.num_slots,
            kv_cache_bytes=self.kv_layout.bytes_per_token() * self.num_slots,
            max_model_len=self.max_model_len,
            device=self.device,
            dtype=str(self.config.torch_dtype()).removeprefix("torch."),
            kv_dtype=str(self.kv_layout.dtype).removeprefix("torch."),
            kv_capacity_ratio=self.kv_capacity_ratio(),
            graph_batch_sizes=list(self.graphs.buckets) if self.graphs is not None else [],
            graph_token_counts=list(self.prefill_graphs.buckets) if self.prefill_graphs is not None else [],
        )

    # -- one step -------------------------------------------------------------------------

    def _update_rows(self, plan: StepPlan) -> None:
        # A state dropped here (or replaced below) gives back its rows of the sampler's
        # PenaltyTable once the last launched step that holds it is done (SamplingState.__del__).
        for row in plan.freed_rows:
            self.states.pop(row, None)
            self.prompts.pop(row, None)
            self.constrained_rows.discard(row)
            self.images.free_row(row)
        rows: list[int] = []
        cols: list[int] = []
        slots: list[int] = []
        for s in plan.seqs:
            if s.new_row is not None:
                self._new_row(s.row, s.new_row)
            if s.prefix_slots:
                rows += [s.row] * len(s.prefix_slots)
                cols += range(len(s.prefix_slots))
                slots += s.prefix_slots
            rows += [s.row] * len(s.out_slots)
            cols += range(s.start_pos, s.start_pos + len(s.out_slots))
            slots += s.out_slots
        if rows:  # one scatter into req_to_token for the whole step
            index = to_device([rows, cols], torch.int64, self.device)
            values = to_device(slots, torch.int32, self.device)
            self.req_to_token.index_put_((index[0], index[1]), values)

    def _new_row(self, row: int, new: NewRow) -> None:
        state = self.states[row] = SamplingState(new.params, new.prompt_token_ids, new.output_token_ids, new.stop_token_ids)
        if new.params.prompt_logprobs is not None:
            self.prompts[row] = new.prompt_token_ids
        self.images.set_row(row, new.images)
        if new.params.structured_output is not None:
            state.compiled_grammar = self.grammar.compile(new.params.structured_output)
            self.constrained_rows.add(row)
        else:
            self.constrained_rows.discard(row)

    @staticmethod
    def _is_plain_decode(s: SeqStep) -> bool:
        return len(s.token_ids) == 1 and s.sample and s.prompt_logprobs is None

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step and wait for its tokens."""
        return self.launch(plan).finish()

    @torch.inference_mode()
    def launch(self, plan: StepPlan, on_forward_queued: Callable[[], None] | None = None) -> PendingStep:
        """Queue one step's work on the device, up to its tokens' copy to the host; the host
        may prepare the next step while it runs (`PendingStep.finish` waits for the tokens).

        `on_forward_queued` is called once, when the step's forward pass is queued and before
        its sampling: the worker sends the previous step's result there, so that result waits
        only for the previous step, and this step's sampling sees all of its tokens (seeds,
        min_tokens and penalties count them). Nothing before it waits for the device: the
        inputs go through pinned memory (engine/worker/transfer.py); a step with prompt logprobs, which
        reads them back before sampling, calls it first.

        With CUDA graphs, a step of plain decodes (one token, sampled) replays a decode graph. A
        step that also has prefill chunks (or prompt logprobs) runs as one packed pass, a
        prefill graph when one fits, in which the leading one-token sequences (the running
        decodes: the scheduler puts them first) take the decode attention kernel: one pass over
        the weights, with every token in each GEMM. With `fuse_mixed_steps` off, the plain
        decodes replay a decode graph and the rest runs right after as a second pass."""
        self._update_rows(plan)
        seqs = plan.seqs
        result = StepResult(plan.step_id, [], [])
        if on_forward_queued is not None and (
            not seqs or any(s.prompt_logprobs is not None for s in seqs)
        ):  # prompt logprobs are read back before sampling: let the previous result go first
            on_forward_queued()
            on_forward_queued = None
        if not seqs:
            return PendingStep(result)
        logits, sample_idx = self._forward(seqs, result)
        if on_forward_queued is not None:
            on_forward_queued()
        if logits is None:
            return PendingStep(result)
        # Every rank samples (the gathered logits and the random streams are the same on every
        # rank) and keeps the tokens for the next step's placeholders; rank 0 sends the result.
        states = [self.states[seqs[i].row] for i in sample_idx]
        # (after on_forward_queued: the previous step's tokens are in its matchers)
        mask = None
        if self.constrained_rows:
            mask = self.grammar.fill(states)
        else:
            self.grammar.forget_last_step()
        pending = self.sampler.sample_async(logits, states, mask)
        rows = to_device([seqs[i].row for i in sample_idx], torch.long, self.device)
        self.last_sampled.index_copy_(0, rows, pending.sampled)
        return PendingStep(result, pending, states)

    def _forward(self, seqs: list[SeqStep], result: StepResult) -> tuple[torch.Tensor | None, list[int]]:
        """Queue the step's forward passes (see `launch`) -> (logits of the rows to sample, in plan
        order, or None; their plan indices); prompt logprobs go into `result`."""
        decode_idx: list[int] = []
        if self.graphs is not None and not self.images.in_step(seqs):  # (graphs take token ids only)
            decode_idx = [i for i, s in enumerate(seqs) if self._is_plain_decode(s)]
            if not self.graphs.can_run(len(decode_idx)) or (
                len(decode_idx) < len(seqs) and self._fuses(seqs, decode_idx)
            ):  # all in one packed pass (its leading decodes still take the decode kernel)
                decode_idx = []
        parts: list[tuple[torch.Tensor, list[int]]] = []  # (logits, their plan indices)
        if decode_idx:
            assert self.graphs is not None
            decodes = [seqs[i] for i in decode_idx]
            logits = self.graphs.run(
                [s.token_ids[0] for s in decodes], [s.start_pos for s in decodes], [s.row for s in decodes],
                [s.out_slots[0] for s in decodes], self.images.rope_positions(decodes),
            )
            parts.append((logits, decode_idx))
        if len(decode_idx) < len(seqs):
            in_graph = set(decode_idx)
            rest_idx = [i for i in range(len(seqs)) if i not in in_graph]
            packed_logits, sample_idx = self._forward_packed([seqs[i] for i in rest_idx], rest_idx, result)
            if packed_logits is not None:
                parts.append((packed_logits, sample_idx))
        if not parts:
            return None, []
        if len(parts) == 1:
            return parts[0]
        # both passes sampled: rows back in plan order
        sample_idx = parts[0][1] + parts[1][1]
        order = sorted(range(len(sample_idx)), key=sample_idx.__getitem__)
        logits = torch.cat([parts[0][0], parts[1][0]])[to_device(order, torch.long, self.device)]
        return logits, [sample_idx[j] for j in order]

    def _fuses(self, seqs: list[SeqStep], decode_idx: list[int]) -> bool:
        """Whether a step with prefill chunks runs its plain decodes (`decode_idx`) in the same
        packed pass (see `_FUSED_MIN_DECODE_PROGRAMS`)."""
        if not (self.config.fuse_mixed_steps and self.model.triton_attention):
            return False
        if len(decode_idx) * self.num_kv_heads >= _FUSED_MIN_DECODE_PROGRAMS:
            return True
        return max((seqs[i].start_pos for i in decode_idx), default=0) < _FUSED_MAX_SHORT_CONTEXT

    def _forward_packed(
        self, seqs: list[SeqStep], plan_idx: list[int], result: StepResult
    ) -> tuple[torch.Tensor | None, list[int]]:
        """`seqs` (the plan's entries at `plan_idx`) as one packed batch through the model (a
        prefill graph when one fits, else eagerly) -> (logits of the rows to sample, their plan
        indices); prompt logprobs go into `result`."""
        graphs = self.prefill_graphs if not self.images.in_step(seqs) else None
        bucket = graphs.bucket_for(seqs) if graphs is not None else None
        if bucket is not None:
            assert self.prefill_graphs is not None
            hidden = self.prefill_graphs.run(seqs, bucket, self.images.rope_positions(seqs))
        else:
            hidden = self._forward_eager(seqs)
        ends = [0]
        for s in seqs:
            ends.append(ends[-1] + len(s.token_ids))
        self._prompt_logprobs(seqs, plan_idx, hidden, ends, result)
        sampled = [j for j, s in enumerate(seqs) if s.sample]
        if not sampled:
            return None, []
        last_tokens = to_device([ends[j + 1] - 1 for j in sampled], torch.long, self.device)
        # [num_sampled, vocab] float32; the gather across ranks is collective: every rank computes it
        return self.model.compute_logits(hidden[last_tokens]), [plan_idx[j] for j in sampled]

    def _forward_eager(self, seqs: list[SeqStep]) -> torch.Tensor:
        flat = [t for s in seqs for t in s.token_ids]
        input_ids = to_device(flat, torch.int64, self.device)
        if min(flat) < 0:  # placeholders: the tokens the previous step sampled for those rows
            rows = [s.row for s in seqs for _ in s.token_ids]
            at = [j for j, t in enumerate(flat) if t < 0]
            index = to_device(at, torch.long, self.device)
            input_ids[index] = self.last_sampled[to_device([rows[j] for j in at], torch.long, self.device)]
        out_slots = torch.tensor([t for s in seqs for t in s.out_slots], dtype=torch.int64)
        ctx = build_forward_context(
            self.kv,
            self.req_to_token,
            req_indices=[s.row for s in seqs],
            start_pos=[s.start_pos for s in seqs],
            new_lens=[len(s.token_ids) for s in seqs],
            out_slots=out_slots,
        )
        rope = self.images.rope_positions(seqs)  # an M-RoPE model's rows with images: their own positions
        if rope is not None:
            ctx.positions = to_device(torch.from_numpy(np.ascontiguousarray(rope)), torch.int64, self.device)
        image_embeds = self.images.step_embeds(seqs)  # (passed only to a model that takes images)
        with set_forward_context(ctx):  # -> [num_tokens, hidden]
            return self.model(input_ids, ctx.positions, *(() if image_embeds is None else (image_embeds,)))

    def _prompt_logprobs(
        self, seqs: list[SeqStep], plan_idx: list[int], hidden: torch.Tensor, ends: list[int], result: StepResult
    ) -> None:
        for j, (i, s) in enumerate(zip(plan_idx, seqs, strict=True)):
            if s.prompt_logprobs is None:
                continue
            prompt = self.prompts[s.row]
            # Position p predicts token p + 1; only positions whose successor is a prompt token count.
            first, last = s.start_pos, min(s.start_pos + len(s.token_ids), len(prompt) - 1)
            if last <= first:
                result.prompt_logprobs[i] = []
                continue
            rows = hidden[ends[j] : ends[j] + (last - first)]
            logits = self.model.compute_logits(rows)
            if self.tp_rank != 0:
                continue
            targets = prompt[first + 1 : last + 1]
            with host_wait_allowed():  # read back here, before sampling
                result.prompt_logprobs[i] = compute_prompt_logprobs(logits, targets, s.prompt_logprobs)
