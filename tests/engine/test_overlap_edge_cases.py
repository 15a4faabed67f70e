"""Overlapped steps at their edges: aborts and stops with two steps in flight, preemption, n > 1,
prompt logprobs, context-length ends, a mixed graph + eager step, errors while planning ahead."""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from engine.outputs import OutputAccumulator, RequestOutput
from tests.engine.models.harness import save_tiny_model, tiny_config
from tests.engine.test_overlap import one_step_at_a_time


def _sync(core, reqs) -> dict[str, RequestOutput]:
    accs = {}
    with one_step_at_a_time(core):
        for rid, prompt, p in reqs:
            core.add_request(rid, prompt, p)
            accs[rid] = OutputAccumulator(p.n)
        while core.has_work:
            for out in core.step():
                accs[out.request_id].add(out)
    return {rid: accs[rid].result() for rid in accs}


def _overlapped(core, reqs, hook=None) -> dict[str, RequestOutput]:
    """Overlapped steps driven by hand, as the server's loop does: planned, then sent; hook(core,
    n) runs after the plans are sent, with steps in flight."""
    accs = {}
    for rid, prompt, p in reqs:
        core.add_request(rid, prompt, p)
        accs[rid] = OutputAccumulator(p.n)
    n = 0
    while core.has_work:
        core.plan_ahead()
        core.send_planned()
        if not core.num_in_flight:
            continue
        if hook is not None:
            hook(core, n)
        n += 1
        for out in core.process_result(core.recv_result()).outputs:
            if out.request_id in accs:
                accs[out.request_id].add(out)
    return {rid: accs[rid].result() for rid in accs if accs[rid]._last is not None}


def _tokens(out: RequestOutput):
    return [(c.token_ids, c.finish_reason) for c in out.outputs]


def _greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_model(str(path), tiny_config("llama", max_position_embeddings=64))
    return str(path)


def _llm(model_dir, slots=200, **kw) -> LLM:
    settings = dict(dtype="float32", kv_cache_memory_gb=slots * 2 * 2 * 2 * 16 * 4 / 2**30,
                    max_num_batched_tokens=24, max_num_seqs=6, enable_prefix_caching=True)
    settings.update(kw)
    return LLM(model_dir, **settings)


def _check_cache_is_sound(llm: LLM, histories: list[list[int]]) -> None:
    """Every history (prompt + generated tokens) continued with and without the prefix cache:
    a cached prefix whose K/V is wrong changes the greedy continuation."""
    params = _greedy(6, logprobs=0)
    histories = [h[:56] for h in histories]
    with_cache = llm.generate([h + [7] for h in histories], params)
    llm.core.scheduler.reset_prefix_cache()
    fresh = llm.generate([h + [7] for h in histories], params)
    for a, b in zip(with_cache, fresh, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [d[t].logprob for d, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids, strict=True)] == pytest.approx(
            [d[t].logprob for d, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids, strict=True)], abs=1e-4)


def test_admission_batch_reaches_the_scheduler(model_dir: str) -> None:
    with _llm(model_dir, admission_batch=4) as llm:
        assert llm.core.scheduler.config.admission_batch == 4


def _prompts(seed: int, num: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(num)]


def test_abort_with_two_steps_in_flight(model_dir: str) -> None:
    prompts = _prompts(1, 5)
    reqs = [(f"r{i}", p, _greedy(12 + i, logprobs=1)) for i, p in enumerate(prompts)]
    with _llm(model_dir) as llm:
        free = llm.core.allocator.num_free
        want = _sync(llm.core, [(f"s{i}", p, prm) for i, (_, p, prm) in enumerate(reqs)])
        llm.core.scheduler.reset_prefix_cache()
        aborted = {}

        def hook(core, n):
            if n == 5:  # decoding, two steps in flight
                assert core.num_in_flight == 2
                for rid in ("r1", "r3"):
                    seq = core.requests[rid].choices[0].seq
                    aborted[rid] = list(seq.prompt_token_ids) + seq.output_token_ids[: seq.num_sampled_tokens]
                    core.abort_request(rid)

        got = _overlapped(llm.core, reqs, hook)
        for i in (0, 2, 4):
            assert _tokens(got[f"r{i}"]) == _tokens(want[f"s{i}"])
        assert not llm.core.num_in_flight
        _check_cache_is_sound(llm, list(aborted.values()))
        llm.core.scheduler.reset_prefix_cache()
        assert llm.core.allocator.num_free == free


def test_stop_token_with_a_step_in_flight_caches_sound_kv(model_dir: str) -> None:
    prompts = _prompts(2, 6)
    with _llm(model_dir) as llm:
        probe = llm.generate(prompts, _greedy(20))
        stops = [o.outputs[0].token_ids[5 + i] for i, o in enumerate(probe)]
        llm.core.scheduler.reset_prefix_cache()
        params = [SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[s]) for s in stops]
        got = llm.generate(prompts, params)
        histories = []
        for p, o in zip(prompts, got, strict=True):
            assert o.outputs[0].finish_reason == "stop"
            histories.append(p + o.outputs[0].token_ids)
        _check_cache_is_sound(llm, histories)


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("admission", ["aggressive", "conservative"])
def test_random_mix_matches_one_step_at_a_time(model_dir: str, prefix: bool, admission: str) -> None:
    rng = random.Random(hash((prefix, admission)) & 0xFFFF)
    prompts = _prompts(3, 12, 2, 40)
    params = []
    for i, p in enumerate(prompts):
        kw: dict = dict(temperature=0.0, ignore_eos=True, logprobs=1)
        # max_model_len 64: some run to the context's end (max_tokens None)
        kw["max_tokens"] = None if i % 3 == 0 else rng.randrange(1, 64 - len(p))
        if i % 4 == 1:
            kw.update(n=3, temperature=0.8, seed=i)
        if i % 5 == 2:
            kw.update(prompt_logprobs=1)
        if i % 6 == 3:
            kw.update(temperature=1.0, seed=7, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3)
        if i % 7 == 4:
            kw.update(min_tokens=min(5, kw["max_tokens"] or 5), stop_token_ids=list(range(256)), ignore_eos=False)
        params.append(SamplingParams(**kw))
    with _llm(model_dir, slots=160, enable_prefix_caching=prefix, admission=admission,
              max_num_batched_tokens=16) as llm:
        want = _sync(llm.core, [(f"s{i}", p, prm) for i, (p, prm) in enumerate(zip(prompts, params, strict=True))])
        llm.core.scheduler.reset_prefix_cache()
        before = llm.core.scheduler.num_preemptions
        got = llm.generate(prompts, params)
        assert admission == "conservative" or llm.core.scheduler.num_preemptions > before
        for i, g in enumerate(got):
            w = want[f"s{i}"]
            assert _tokens(g) == _tokens(w), i
            if w.prompt_logprobs is not None:
                assert len(g.prompt_logprobs) == len(w.prompt_logprobs)
        if prefix:
            _check_cache_is_sound(llm, [p + c.token_ids for p, g in zip(prompts, got, strict=True) for c in g.outputs])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_logprobs_survive_preemption_mid_prefill(model_dir: str, seed: int) -> None:
    prompts = _prompts(10 + seed, 10, 20, 50)
    params = [_greedy(60 - len(p), prompt_logprobs=1) for p in prompts]
    with _llm(model_dir, slots=120, admission="aggressive", max_num_batched_tokens=16, enable_prefix_caching=False) as llm:
        got = llm.generate(prompts, params)
        assert llm.core.scheduler.num_preemptions > 0
    for p, g in zip(prompts, got, strict=True):
        assert len(g.prompt_logprobs) == len(p)


def test_an_error_while_planning_ahead_does_not_hang_generate(model_dir: str) -> None:
    import signal

    class Boom(Exception):
        pass

    class Hung(BaseException):
        pass

    def on_alarm(*_):
        raise Hung("LLM.generate hung in drain() waiting for a step that was never sent")

    with _llm(model_dir) as llm:
        core = llm.core
        real = core.scheduler.schedule
        calls = {"n": 0}

        def schedule():
            calls["n"] += 1
            if calls["n"] == 2:  # plan_ahead's second plan (the first is sent, its result due)
                raise Boom()
            return real()

        core.scheduler.schedule = schedule
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(15)
        try:
            with pytest.raises(Boom):
                llm.generate([[5, 6, 7], [8, 9, 10]], _greedy(5))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            core.scheduler.schedule = real
        assert core.dead_reason is None and not core.num_in_flight


def _runner(model_dir: str, graphs: bool, fuse: bool = True):
    import torch

    from engine.config import EngineConfig
    from engine.messages import SeqStep, StepResult
    from engine.models.loader import load_hf_config, load_model
    from engine.worker.model_runner import ModelRunner

    config = EngineConfig(model=model_dir, dtype="float32", device="cpu", kv_cache_memory_gb=0.001,
                          max_num_seqs=4, fuse_mixed_steps=fuse).resolve(max_position_embeddings=64)
    hf = load_hf_config(model_dir)
    runner = ModelRunner(config, load_model(model_dir, torch.float32, "cpu"), hf)
    if graphs:
        class EagerDecodePart:  # stands in for DecodeGraphs (a GPU's): the same decode pass, run eagerly
            def can_run(self, n: int) -> bool:
                return n > 0

            def run(self, ids, positions, rows, slots, rope_positions=None):  # (None: no M-RoPE model)
                seqs = [SeqStep(row=r, start_pos=p, token_ids=[t], out_slots=[s], sample=True)
                        for t, p, r, s in zip(ids, positions, rows, slots, strict=True)]
                logits, _ = runner._forward_packed(seqs, list(range(len(seqs))), StepResult(0, [], []))
                return logits

        runner.graphs = EagerDecodePart()  # type: ignore[assignment]
    return runner


def test_mixed_graph_and_eager_step_keeps_plan_order_and_placeholders(model_dir: str) -> None:
    from engine.messages import NewRow, SeqStep, StepPlan
    from engine.router.seq import PLACEHOLDER_TOKEN

    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
    prompts = {0: [5, 6, 7, 8], 1: [9, 10, 11], 2: [12, 13, 14, 15, 16], 3: [40, 41, 42, 43, 44, 45]}
    base = {0: 0, 1: 100, 2: 200, 3: 300}

    def plans():
        # step 1: rows 0..2 prefill and sample
        yield StepPlan(1, [SeqStep(r, 0, p, [base[r] + i for i in range(len(p))], True,
                                   new_row=NewRow(greedy, p, [])) for r, p in prompts.items() if r < 3])
        # steps 2..4: rows 0 and 2 decode placeholders, row 1 decodes too; row 3 prefills in chunks
        pos = {r: len(prompts[r]) for r in range(3)}
        chunks = [[40, 41], [42, 43], [44, 45]]
        for k in range(3):
            seqs = []
            for r in (0, 1):
                seqs.append(SeqStep(r, pos[r], [PLACEHOLDER_TOKEN], [base[r] + pos[r]], True))
            p3 = 2 * k
            seqs.append(SeqStep(3, p3, chunks[k], [base[3] + p3, base[3] + p3 + 1], k == 2,
                                new_row=NewRow(greedy, prompts[3], []) if k == 0 else None))
            seqs.append(SeqStep(2, pos[2], [PLACEHOLDER_TOKEN], [base[2] + pos[2]], True))
            for r in range(3):
                pos[r] += 1
            yield StepPlan(2 + k, seqs)

    results = {}
    # Eager; a decode graph whose mixed steps run as one packed pass (fused); and one whose mixed
    # steps replay it for their decodes, then the rest as a second pass, sampled in plan order.
    for graphs, fuse in ((False, True), (True, True), (True, False)):
        runner = _runner(model_dir, graphs, fuse)
        out = []
        for plan in plans():
            res = runner.execute(plan)
            out.append((res.sampled_token_ids, [lp.logprob for lp in res.sampled_logprobs]))
        results[graphs, fuse] = out
    for key in ((True, True), (True, False)):
        assert [ids for ids, _ in results[key]] == [ids for ids, _ in results[False, True]]
        for (_, a), (_, b) in zip(results[key], results[False, True], strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_few_long_decodes_keep_the_decode_graph(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A mixed step runs its decodes in the packed pass, unless they are few and long (the fused
    # graph gives each one program per kv head): then they replay the decode graph.
    import engine.worker.model_runner as model_runner
    from engine.messages import NewRow, SeqStep, StepPlan

    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    prompts = {0: list(range(5, 15)), 1: list(range(20, 30)), 2: [40, 41, 42]}

    def plans():
        yield StepPlan(1, [SeqStep(r, 0, prompts[r], [10 * r + i for i in range(10)], True,
                                   new_row=NewRow(greedy, prompts[r], [])) for r in (0, 1)])
        yield StepPlan(2, [SeqStep(0, 10, [7], [10], True), SeqStep(1, 10, [8], [20], True),
                           SeqStep(2, 0, prompts[2], [30, 31, 32], True, new_row=NewRow(greedy, prompts[2], []))])

    tokens = {}
    for short_context in (model_runner._FUSED_MAX_SHORT_CONTEXT, 8):  # decodes at position 10: short, then long
        monkeypatch.setattr(model_runner, "_FUSED_MAX_SHORT_CONTEXT", short_context)
        runner = _runner(model_dir, graphs=True)
        replays: list[int] = []

        def counted(*args, run=runner.graphs.run, replays=replays):
            replays.append(len(args[0]))
            return run(*args)

        runner.graphs.run = counted  # type: ignore[method-assign]
        tokens[short_context] = [runner.execute(plan).sampled_token_ids for plan in plans()]
        assert replays == ([] if short_context > 10 else [2])
    assert tokens[8] == tokens[model_runner._FUSED_MAX_SHORT_CONTEXT]


def test_mixed_step_warm_up_touches_only_the_dummy_slot(model_dir: str) -> None:
    # The start-up pass that compiles eager mixed steps' decode launches (on a GPU) runs decodes
    # up to the context length over the dummy slot: the pool and req_to_token stay as they were.
    runner = _runner(model_dir, graphs=False)
    dummy = runner.kv.dummy_slot
    runner.kv.k[0][:dummy].fill_(0.5)
    runner.kv.k[0][dummy].zero_()
    before = ([k[:dummy].clone() for k in runner.kv.k], [v[:dummy].clone() for v in runner.kv.v],
              runner.req_to_token.clone())
    runner._warm_up_mixed_steps()
    assert all((k[:dummy] == b).all() for k, b in zip(runner.kv.k, before[0], strict=True))
    assert all((v[:dummy] == b).all() for v, b in zip(runner.kv.v, before[1], strict=True))
    assert (runner.req_to_token == before[2]).all()
    assert runner.kv.k[0][dummy].abs().sum() > 0  # it did run: its K/V went to the dummy slot


def test_prompt_logprobs_complete_after_a_preemption_that_moves_chunk_boundaries(model_dir: str) -> None:
    import dataclasses

    prompt = [(7 * i + 3) % 250 + 3 for i in range(30)]
    params = _greedy(3, prompt_logprobs=1)
    with _llm(model_dir, slots=200, max_num_batched_tokens=8) as llm:
        want = llm.generate([prompt], params)[0]
        acc = OutputAccumulator(1)
        with one_step_at_a_time(llm.core) as core:  # nothing in flight at the preemption
            core.add_request("r", prompt, params)
            for _ in range(2):  # two chunks of 8: logprobs for positions 1..16
                for out in core.step():
                    acc.add(out)
            seq = core.requests["r"].choices[0].seq
            core.scheduler._preempt(seq, [])  # recomputed from scratch, now in chunks of 5
            core.scheduler.config = dataclasses.replace(core.scheduler.config, max_num_batched_tokens=5)
            while core.has_work:
                for out in core.step():
                    acc.add(out)
        got = acc.result()
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(prompt)
    for g, w, t in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], prompt[1:], strict=True):
        assert g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4)
