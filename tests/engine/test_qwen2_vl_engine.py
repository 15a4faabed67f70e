"""Qwen2-VL / Qwen2.5-VL through the engine (`LLM`, worker processes): chunked prefill cut inside
images, preemption and the prefix cache giving the same answers as a roomy run, each request
the same in a batch as alone (the M-RoPE shift of each row kept apart). Tensor parallel 2 = 1:
tests/engine/test_tensor_parallel.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import LLM, SamplingParams
from engine.models.loader import load_hf_config
from engine.multimodal import ImageInput, image_processor_for
from tests.engine.local_worker import LocalWorker, counted_embeds, in_process_workers
from tests.engine.models.test_qwen2_vl import (
    IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    _image,
    _text,
    save_tiny_qwen2_vl,
)

_IMAGE = [VISION_START, IMAGE_TOKEN, VISION_END]


@pytest.fixture(scope="module", params=["qwen2_vl", pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    save_tiny_qwen2_vl(path, request.param)
    return path


def requests_with_images(model_dir: Path) -> tuple[list[list[int]], list[list[ImageInput]]]:
    """Prompts with one image, two images of different sizes, none, and the first image again
    after the same text (a prefix cache hit over the image)."""
    processor = image_processor_for(str(model_dir), load_hf_config(str(model_dir)), None)
    assert processor is not None
    one = [processor.preprocess(_image(40, 50, seed=1))]
    two = [processor.preprocess(_image(64, 31, seed=2)), processor.preprocess(_image(30, 90, seed=3))]
    shapes: list[tuple[list[int], list[ImageInput]]] = [
        ([*_text(4, 1), *_IMAGE, *_text(6, 2)], one),
        ([*_text(3, 3), *_IMAGE, *_text(2, 4), *_IMAGE, *_text(5, 5)], two),
        (_text(21, 6), []),
        ([*_text(4, 1), *_IMAGE, *_text(9, 7)], one),
    ]
    prompts = [processor.expand_placeholders(ids, images) for ids, images in shapes]
    return prompts, [images for _, images in shapes]


def generate_with_images(model_dir: Path, repeat: int = 1, max_tokens: int = 16, **kwargs: Any) -> list[Any]:
    """[(token ids, logprobs, cached tokens) per request..., the run's preemptions]"""
    prompts, images = requests_with_images(model_dir)
    prompts, images = prompts * repeat, images * repeat
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    kwargs.setdefault("max_num_batched_tokens", 16)
    with LLM(str(model_dir), dtype="float32", **kwargs) as llm:
        assert llm.image_processor is not None and llm.image_processor.image_token_id == IMAGE_TOKEN
        outs = llm.generate(prompts, params, images=images)
        preemptions = llm.core.scheduler.num_preemptions
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.num_cached_tokens) for o in outs] + [preemptions]


def same_answers(a: list[Any], b: list[Any]) -> bool:
    """Same tokens and logprobs within float32 noise."""
    for (ids_a, lps_a, _), (ids_b, lps_b, _) in zip(a, b, strict=True):
        if ids_a != ids_b:
            return False
        for la, lb in zip(lps_a, lps_b, strict=True):
            if any(abs(la[t].logprob - lb[t].logprob) > 1e-4 for t in la if t in lb):
                return False
    return True


def test_batched_equals_each_alone(model_dir: Path) -> None:
    """All four requests in one engine (chunks of 16 tokens cut inside the images, rows with and
    without images decoded together) against each run alone in an engine of its own."""
    prompts, images = requests_with_images(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with LLM(str(model_dir), dtype="float32", kv_cache_memory_gb=0.01, max_num_batched_tokens=16,
             enable_prefix_caching=False) as llm:
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, images=images)]
        alone = [llm.generate([p], params, images=[i])[0].outputs[0].token_ids for p, i in zip(prompts, images, strict=True)]
    assert together == alone
    assert len({tuple(t) for t in together}) == 4


def test_one_image_a_step_gives_the_answers_of_each_alone(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All four requests in steps of 512 tokens, at most one image token a step: every image (each
    larger than that) runs alone in its step, the chunks stopping before the next one, and each
    request's answer is the one it gets alone."""
    prompts, images = requests_with_images(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    options: dict[str, Any] = dict(dtype="float32", kv_cache_memory_gb=0.01, enable_prefix_caching=False)
    with LLM(str(model_dir), **options) as llm:
        alone = [llm.generate([p], params, images=[i])[0].outputs[0].token_ids for p, i in zip(prompts, images, strict=True)]
    with in_process_workers(monkeypatch), LLM(str(model_dir), max_image_tokens_per_step=1, **options) as llm:
        assert LocalWorker.last is not None
        batches = counted_embeds(LocalWorker.last.model)
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, images=images)]
    assert together == alone
    # one image a batch; the fourth request's image is the first's, but the worker keeps recent
    # embeddings only up to the same bound: it is embedded again
    assert batches == [1, 1, 1, 1]


def test_preemption_and_prefix_cache_give_the_same_answers(model_dir: Path) -> None:
    roomy = generate_with_images(model_dir, repeat=2, max_tokens=32, kv_cache_memory_gb=0.01,
                                 enable_prefix_caching=False)
    assert all(cached == 0 for _, _, cached in roomy[:-1])
    cached = generate_with_images(model_dir, repeat=2, max_tokens=32, kv_cache_memory_gb=0.01)
    assert same_answers(roomy[:-1], cached[:-1])
    assert cached[3][2] >= 4 + 1 + 30  # the repeated image and the text before it came from the cache
    # A pool of 140 tokens (512 bytes each) for eight prompts of 21 to 90 tokens with 32 answer
    # tokens each: sequences are preempted and recompute their prompts, images included
    tight = generate_with_images(
        model_dir, repeat=2, max_tokens=32, kv_cache_memory_gb=140 * 512 / 2**30, max_num_seqs=6,
        admission="aggressive",
    )
    assert tight[-1] > 0
    assert same_answers(roomy[:-1], tight[:-1])
