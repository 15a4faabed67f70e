"""The engine's step cycle in the server process: plan → send → receive → process.

`EngineCore` owns the router (scheduler + slot allocator), the worker handle, the tokenizer
and the per-request output state (detokenizers, stop-string matchers). It produces *delta*
`RequestOutput`s: each carries what one step added to each choice that changed. `LLM` and
`AsyncEngine` turn deltas into what their callers asked for. `step()` runs one turn of the
cycle, the next step planned and sent while the worker runs the current one (`plan_ahead`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from functools import partial

from engine.config import EngineConfig
from engine.distributed import check_tensor_parallel
from engine.errors import EngineDeadError, PromptTooLongError
from engine.grammar.compiler import GrammarCompiler, compiler_in_background, model_compiler
from engine.messages import StepPlan, StepResult, TokenLogprobs
from engine.model_config import ModelConfig
from engine.models.loader import load_hf_config, resolve_model
from engine.multimodal import ImageInput, image_processor_for, place_images
from engine.output_processor import Choice, ProcessedStep, RequestState, flush_text, request_output
from engine.outputs import CompletionOutput, Logprob, LogprobsDict, RequestOutput
from engine.router.detokenizer import (
    Detokenizers,
    StopStringMatcher,
    convert_ids_to_logprob_tokens,
)
from engine.router.scheduler import Scheduler, SchedulerOutput
from engine.router.scheduler_config import SchedulerConfig
from engine.router.seq import Seq, SequenceStatus
from engine.router.slot_allocator import KVSlotAllocator
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats
from engine.tokenizer import eos_token_ids, load_tokenizer
from engine.worker.process import ProgressFn
from engine.worker_client import WorkerClient

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


# Overlapped: the step the worker runs and the next one, already sent; 1 without overlap.
_STEPS_IN_FLIGHT = 2


class EngineCore:
    def __init__(self, config: EngineConfig, progress: ProgressFn | None = None) -> None:
        self.model_path = resolve_model(config.model, config.cache_dir)
        hf_config = load_hf_config(self.model_path)
        shape = ModelConfig.from_hf_config(hf_config)
        config = config.resolve(max_position_embeddings=shape.max_position_embeddings)
        if shape.learned_positions and (config.max_model_len or 0) > shape.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} is past the model's {shape.max_position_embeddings} "
                "learned positions (max_position_embeddings)"
            )
        check_tensor_parallel(shape, config.tensor_parallel_size, config.resolved_device())  # before spawning
        self.config = config
        self.model_name = DEFAULT_MODEL_NAME if config.model is None else os.path.basename(
            os.path.normpath(config.model)
        )
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path)
        self.eos_token_ids = eos_token_ids(self.model_path, hf_config, self.tokenizer)
        self.image_processor = image_processor_for(self.model_path, hf_config, self.tokenizer)  # None: text only
        self._detokenizers = Detokenizers(self.tokenizer) if self.tokenizer is not None else None
        self.vocab_size: int = shape.vocab_size
        self.worker = WorkerClient(config, self.model_path)
        info = self.worker.wait_ready(progress)
        self.worker_info = info
        assert config.max_model_len is not None and config.max_num_batched_tokens is not None
        self.max_model_len = min(config.max_model_len, info.max_model_len)
        self.allocator = KVSlotAllocator(info.num_slots)
        self.scheduler = Scheduler(
            SchedulerConfig.from_engine_config(config, info.num_slots, self.max_model_len), self.allocator
        )
        self.requests: dict[str, RequestState] = {}
        self._step_id = 0
        self._in_flight: deque[tuple[SchedulerOutput, StepPlan]] = deque()  # planned, oldest first
        self._unsent: list[StepPlan] = []  # the newest of those, planned and not sent yet
        self.max_in_flight = _STEPS_IN_FLIGHT if config.overlap_scheduling else 1
        logger.info("%s", info.kv_cache_summary())
        # Constraints are compiled here first (a bad one is refused before it runs): the
        # compiler is set up in the background meanwhile, as the worker sets up its own.
        self.grammar: Future[GrammarCompiler] | None = None
        if self.tokenizer is not None:
            self.grammar = compiler_in_background(
                partial(model_compiler, self.tokenizer, self.vocab_size, self.eos_token_ids)
            )

    # -- requests ---------------------------------------------------------------------------

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and check a request; raises ValueError naming the problem."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send token ids as the prompt", "prompt")
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            prompt_ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt_ids):
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token", "prompt")
        if params.max_tokens is None:
            if len(prompt_ids) >= self.max_model_len:
                raise PromptTooLongError(self.max_model_len, len(prompt_ids), 1)
        elif len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(self.max_model_len, len(prompt_ids), params.max_tokens)
        if params.logit_bias and any(not 0 <= t < self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.vocab_size})", "logit_bias")
        if params.structured_output is not None:  # (compiled before: a cache hit)
            self.grammar_compiler().compile(params.structured_output)
        return prompt_ids

    def grammar_compiler(self) -> GrammarCompiler:
        """This model's compiler of constraints (waits for its set-up); ValueError naming
        `structured_output` for a model that ships no tokenizer."""
        if self.grammar is None:
            raise ValueError("this model ships no tokenizer: constrained decoding needs one", "structured_output")
        return self.grammar.result()

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, images: Sequence[ImageInput] = ()
    ) -> RequestState:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use", "request_id")
        prompt_ids = self.validate(prompt, params)  # images: one per placeholder run (engine/multimodal.py)
        image_token_id = self.image_processor.image_token_id if self.image_processor is not None else None
        images_placed, cache_keys = place_images(prompt_ids, images, image_token_id)
        stop_ids = frozenset(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_ids))
        now = time.time()
        choices = []
        for i in range(params.n):
            # Seeded choices of one request must differ from each other: choice i uses seed + i
            # (wrapped past 2**64: the sampler reads seeds modulo 2**64 anyway).
            seq_params = params
            if params.seed is not None and i > 0:
                seed = params.seed + i
                seq_params = dataclasses.replace(params, seed=seed - 2**64 if seed >= 2**64 else seed)
            seq = Seq(
                request_id=request_id, seq_id=f"{request_id}#{i}", index=i, prompt_token_ids=prompt_ids,
                params=seq_params, max_tokens=max_tokens, stop_token_ids=stop_ids, arrival_time=now,
                images=images_placed, prompt_cache_keys=cache_keys,
            )
            detok = None
            if self._detokenizers is not None:
                detok = self._detokenizers.new(
                    prompt_ids, params.skip_special_tokens, params.spaces_between_special_tokens
                )
            matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None  # type: ignore[arg-type]  # a list once built (__post_init__)
            choices.append(Choice(seq, detok, matcher))
        state = RequestState(
            request_id, prompt if isinstance(prompt, str) else None, prompt_ids, params, choices, now,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None, num_unfinished=params.n,
        )
        self.requests[request_id] = state
        for choice in choices:
            self.scheduler.add(choice.seq)
        return state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        outputs = [  # the choices still running end as aborted (before the scheduler marks them so)
            CompletionOutput(c.seq.index, "", [], [] if state.params.logprobs is not None else None, "abort")
            for c in state.choices
            if not c.seq.status.is_finished
        ]
        self.scheduler.abort(request_id)
        return self._output(state, outputs, finished=True)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.scheduler.kv_usage,
            kv_cache_capacity_tokens=self.allocator.num_slots,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
        )

    # -- steps --------------------------------------------------------------------------------

    def schedule(self, overlap: bool = False) -> tuple[SchedulerOutput, StepPlan] | None:
        """Plan the next step. With `overlap`, the plan may be sent while the previous step
        still runs: its tokens count as computed at once, and each sequence it samples gets a
        placeholder for the token, so the step after it can be planned before its result
        arrives; `process(..., overlap=True)` then fills the placeholders in."""
        sched = self.scheduler.schedule()
        if not sched.scheduled and not sched.freed_rows:
            return None
        self._step_id += 1
        for s in sched.scheduled:
            seq = s.seq
            assert seq is not None
            if seq.params.prompt_logprobs is not None:
                s.prompt_logprobs = self._wants_prompt_logprobs(seq, s.start_pos, len(s.token_ids))
        if overlap:
            self.scheduler.update_after_step(sched)
            for s in sched.scheduled:
                if s.sample:
                    seq = s.seq
                    assert seq is not None
                    seq.num_steps_in_flight += 1
                    # its token is not the last one (max_tokens, max_model_len): plan with it
                    if seq.num_output_tokens + 1 < seq.max_tokens and seq.num_tokens + 1 < self.max_model_len:
                        seq.add_placeholder()
        return sched, StepPlan(self._step_id, sched.scheduled, list(sched.freed_rows))

    def _wants_prompt_logprobs(self, seq: Seq, start_pos: int, num_tokens: int) -> int | None:
        state = self.requests.get(seq.request_id)
        if state is None or state.prompt_logprobs is None or seq.index != 0:
            return None
        # A chunk that holds the next position whose logprob is not planned yet. After a
        # recompute (preemption) the chunks may be cut elsewhere: one that overlaps what was
        # already planned computes it again, and `process` keeps only the new positions.
        last = len(seq.prompt_token_ids) - 1
        end = min(start_pos + num_tokens, last)  # the chunk's last target position
        if not start_pos + 1 <= state.prompt_logprobs_planned <= end:
            return None
        state.prompt_logprobs_planned = end + 1
        return seq.params.prompt_logprobs

    # -- the step cycle: plan → send → receive → process, with steps planned ahead -------------

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._in_flight)

    @property
    def num_in_flight(self) -> int:
        """Steps planned whose result is not processed yet (sent, or about to be)."""
        return len(self._in_flight)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def alive(self) -> bool:
        return self.worker.alive

    @property
    def dead_reason(self) -> str | None:
        return self.worker.dead_reason

    def plan_ahead(self, send: bool = False) -> None:
        """Plan steps until `max_in_flight` are in flight (the running one and the next; one
        without `overlap_scheduling`) or nothing is left to plan. With `send` each is sent as
        soon as it is planned; without, `send_planned` must send them before the next wait for
        a result (the server's loop sends from its receiving thread)."""
        while len(self._in_flight) < self.max_in_flight:
            planned = self.schedule(overlap=True)
            if planned is None:
                break
            self._in_flight.append(planned)
            self._unsent.append(planned[1])
            if send:
                self.send_planned()

    def send_planned(self) -> None:
        """Send the planned steps not sent yet, oldest first."""
        plans, self._unsent = self._unsent, []
        for plan in plans:
            self.worker.send_step(plan)

    def recv_result(self) -> StepResult:
        """Wait for the result of the oldest step in flight (sent)."""
        return self.worker.recv_result()

    def process_result(self, result: StepResult) -> ProcessedStep:
        """Take in the result of the oldest step in flight."""
        sched, plan = self._in_flight.popleft()
        if result.step_id != plan.step_id:
            raise RuntimeError(f"result of step {result.step_id}, expected step {plan.step_id}")
        outputs = self.process(sched, plan, result, overlap=True)
        return ProcessedStep(outputs, len(plan.seqs), sched.num_batched_tokens)

    def step(self) -> list[RequestOutput]:
        """One turn of the cycle, each wait in turn: plan (and send) ahead, wait for the oldest
        step in flight, take its result in. The server's loop (`AsyncEngine`) runs the same
        turn with the sending and the wait in a thread."""
        self.plan_ahead(send=True)
        if not self._in_flight:
            return []
        return self.process_result(self.recv_result()).outputs

    def drain(self) -> None:
        """Wait for the steps sent and drop their results (after the requests were aborted)."""
        for _ in self._unsent:  # never sent: nothing comes back for them
            self._in_flight.pop()
        self._unsent = []
        while self._in_flight:
            try:
                self.process_result(self.recv_result())
            except EngineDeadError:
                self._in_flight.clear()

    def process(
        self, sched: SchedulerOutput, plan: StepPlan, result: StepResult, overlap: bool = False
    ) -> list[RequestOutput]:
        """Take a step's results in (`overlap`: the step was planned with `schedule(overlap=True)`)."""
        if not overlap:
            self.scheduler.update_after_step(sched)
        now = time.time()
        changed: dict[str, list[CompletionOutput]] = {}
        for i, entries in result.prompt_logprobs.items():
            s = sched.scheduled[i]
            assert s.seq is not None
            state = self.requests.get(s.seq.request_id)
            # (not a request that reused the id of one aborted while this step ran)
            if state is not None and state.prompt_logprobs is not None and state.choices[0].seq is s.seq:
                # entries are for positions start_pos + 1, ...; keep those not collected yet
                skip = len(state.prompt_logprobs) - (s.start_pos + 1)
                state.prompt_logprobs.extend(self._logprobs_dict(e) for e in entries[max(skip, 0) :])
        sampled = (s for s in sched.scheduled if s.sample)
        for s, token_id, lp in zip(sampled, result.sampled_token_ids, result.sampled_logprobs, strict=True):
            seq = s.seq
            assert seq is not None
            if overlap:
                seq.num_steps_in_flight -= 1
            state = self.requests.get(seq.request_id)
            if state is None or seq.status.is_finished:
                continue  # aborted while the step ran
            if state.first_token_time is None:
                state.first_token_time = now
            delta = self._append_token(state, state.choices[seq.index], token_id, lp)
            changed.setdefault(seq.request_id, []).append(delta)
        outputs = []
        for request_id, deltas in changed.items():
            state = self.requests[request_id]
            finished = state.num_unfinished == 0
            if finished:
                del self.requests[request_id]
            outputs.append(self._output(state, deltas, finished))
        return outputs

    def _append_token(
        self, state: RequestState, choice: Choice, token_id: int, lp: TokenLogprobs | None
    ) -> CompletionOutput:
        seq, params = choice.seq, state.params
        seq.append_token(token_id)
        text = ""
        finish: SequenceStatus | None = None
        stop_reason: int | str | None = None
        num_sampled = seq.num_sampled_tokens
        if token_id in seq.stop_token_ids and num_sampled >= params.min_tokens:
            finish = SequenceStatus.FINISHED_STOPPED
            stop_reason = None if token_id in self.eos_token_ids else token_id
        elif choice.detok is not None:
            text = choice.detok.add(token_id)
            if choice.stop_matcher is not None:
                text, stop_str = choice.stop_matcher.feed(text)
                if stop_str is not None and num_sampled >= params.min_tokens:
                    finish, stop_reason = SequenceStatus.FINISHED_STOPPED, stop_str
        if finish is None and (
            num_sampled >= seq.max_tokens or seq.num_prompt_tokens + num_sampled >= self.max_model_len
        ):
            finish = SequenceStatus.FINISHED_LENGTH
        if finish is not None:
            if not isinstance(stop_reason, str):  # not ended by a stop string: release held-back text
                text += self._flush_text(choice)
            self.scheduler.finish(seq, finish)
            state.num_unfinished -= 1
        logprobs = [self._logprobs_dict(lp)] if (lp is not None and params.logprobs is not None) else None
        if params.logprobs is not None and logprobs is None:
            logprobs = []
        return CompletionOutput(
            seq.index, text, [token_id], logprobs,
            finish.finish_reason if finish is not None else None, stop_reason,
        )

    _flush_text = staticmethod(flush_text)
    _output = staticmethod(request_output)

    def _logprobs_dict(self, lp: TokenLogprobs) -> LogprobsDict:
        ids = [lp.token_id, *lp.top_ids]
        words = convert_ids_to_logprob_tokens(self.tokenizer, ids) if self.tokenizer is not None else [None] * len(ids)
        out: LogprobsDict = {lp.token_id: Logprob(lp.logprob, lp.rank, words[0])}
        for rank, (tid, value, word) in enumerate(zip(lp.top_ids, lp.top_logprobs, words[1:], strict=True), 1):
            if tid not in out:
                out[tid] = Logprob(value, rank, word)
        return out

    def shutdown(self) -> None:
        self.worker.shutdown()
