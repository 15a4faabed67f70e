"""LLaVA 1.5 and LLaVA-NeXT through the engine (`LLM`, worker processes): tensor parallel 2 equal
to 1 (the vision tower replicated on each rank), and (LLaVA 1.5) preemption, chunked prefill and the prefix cache
giving the same answers as a roomy run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import LLM, SamplingParams
from engine.models.loader import load_hf_config
from engine.multimodal import ImageInput, image_processor_for
from tests.engine.local_worker import LocalWorker, counted_embeds, in_process_workers
from tests.engine.models.test_llava import _image, _text, save_tiny_llava

IMAGE_TOKEN = 255


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llava-engine")
    save_tiny_llava(path)
    return path


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llava-next-engine")
    save_tiny_llava(path, next_=True)
    return path


def _requests(model_dir: Path) -> tuple[list[list[int]], list[list[ImageInput]]]:
    """Prompts with one image, two images of different sizes, none, and the first image again
    after the same text (a prefix cache hit over the image)."""
    processor = image_processor_for(str(model_dir), load_hf_config(str(model_dir)), None)
    assert processor is not None
    one = [processor.preprocess(_image(40, 50, seed=1))]
    two = [processor.preprocess(_image(64, 31, seed=2)), processor.preprocess(_image(30, 90, seed=3))]
    shapes: list[tuple[list[int], list[ImageInput]]] = [
        ([*_text(4, 1), IMAGE_TOKEN, *_text(6, 2)], one),
        ([*_text(3, 3), IMAGE_TOKEN, *_text(2, 4), IMAGE_TOKEN, *_text(5, 5)], two),
        (_text(21, 6), []),
        ([*_text(4, 1), IMAGE_TOKEN, *_text(9, 7)], one),
    ]
    prompts = [processor.expand_placeholders(ids, images) for ids, images in shapes]
    return prompts, [images for _, images in shapes]


def _generate(model_dir: Path, repeat: int = 1, max_tokens: int = 16, **kwargs: Any) -> list[Any]:
    """[(token ids, logprobs, cached tokens) per request..., the run's preemptions]"""
    prompts, images = _requests(model_dir)
    prompts, images = prompts * repeat, images * repeat
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    with LLM(str(model_dir), dtype="float32", max_num_batched_tokens=16, **kwargs) as llm:
        assert llm.image_processor is not None and llm.image_processor.image_token_id == IMAGE_TOKEN
        outs = llm.generate(prompts, params, images=images)
        preemptions = llm.core.scheduler.num_preemptions
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.num_cached_tokens) for o in outs] + [preemptions]


def _close(a: list[Any], b: list[Any]) -> bool:
    """Same tokens and logprobs within float32 noise."""
    for (ids_a, lps_a, _), (ids_b, lps_b, _) in zip(a, b, strict=True):
        if ids_a != ids_b:
            return False
        for la, lb in zip(lps_a, lps_b, strict=True):
            if any(abs(la[t].logprob - lb[t].logprob) > 1e-4 for t in la if t in lb):
                return False
    return True


@pytest.mark.parametrize("model_dir", ["llava_dir", "llava_next_dir"])
def test_tensor_parallel_2_equals_1(model_dir: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model_dir)
    tp1 = _generate(path, kv_cache_memory_gb=0.01)
    tp2 = _generate(path, kv_cache_memory_gb=0.01, tensor_parallel_size=2)
    assert _close(tp1[:-1], tp2[:-1])


def test_preemption_and_prefix_cache_give_the_same_answers(llava_dir: Path) -> None:
    roomy = _generate(llava_dir, repeat=2, max_tokens=48, kv_cache_memory_gb=0.01, enable_prefix_caching=False)
    assert all(cached == 0 for _, _, cached in roomy[:-1])
    cached = _generate(llava_dir, repeat=2, max_tokens=48, kv_cache_memory_gb=0.01)
    assert _close(roomy[:-1], cached[:-1])
    assert cached[3][2] >= 4 + 25  # the repeated image and the text before it came from the cache
    # A pool of 120 tokens (512 bytes each) for eight prompts of 21 to 60 tokens with 48 answer
    # tokens each: sequences are preempted and recompute their prompts, images included
    tight = _generate(
        llava_dir, repeat=2, max_tokens=48, kv_cache_memory_gb=120 * 512 / 2**30, max_num_seqs=6,
        admission="aggressive",
    )
    assert tight[-1] > 0
    assert _close(roomy[:-1], tight[:-1])


@pytest.mark.parametrize("next_", [False, True])
def test_an_image_processor_of_another_size_than_the_tower_is_refused_at_start(tmp_path: Path, next_: bool) -> None:
    """preprocessor_config.json cropping to 36 px for a 30 px vision tower: refused when the engine
    starts, not a worker that dies on the first image (and every request after it)."""
    import transformers

    save_tiny_llava(tmp_path, next_=next_)
    Processor: Any = transformers.LlavaNextImageProcessor if next_ else transformers.CLIPImageProcessor
    Processor(size={"shortest_edge": 36}, crop_size={"height": 36, "width": 36}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="36 x 36 px where the vision tower reads 30 x 30"):
        LLM(str(tmp_path), dtype="float32")


def test_a_step_embeds_at_most_max_image_tokens_per_step_with_the_answers_of_each_alone(
    llava_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four requests (four images of 25 tokens, the last the first's) in one step of 512 tokens; at
    most 50 image tokens a step: the images come two by two, each request's answer as alone."""
    prompts, images = _requests(llava_dir)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    options: dict[str, Any] = dict(dtype="float32", kv_cache_memory_gb=0.01, enable_prefix_caching=False)
    with LLM(str(llava_dir), **options) as llm:
        alone = [llm.generate(p, params, images=[i])[0].outputs[0].token_ids for p, i in zip(prompts, images, strict=True)]
    with in_process_workers(monkeypatch), LLM(str(llava_dir), max_image_tokens_per_step=50, **options) as llm:
        assert LocalWorker.last is not None
        batches = counted_embeds(LocalWorker.last.model)
        together = llm.generate(prompts, params, images=images)
    assert [o.outputs[0].token_ids for o in together] == alone
    # two images a step (unbounded: all in the first); the fourth request's image is the first's,
    # taken from the worker's recent embeddings
    assert batches == [2, 1]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_the_choices_of_one_request_embed_its_image_once(
    llava_dir: Path, monkeypatch: pytest.MonkeyPatch, prefix_cache: bool
) -> None:
    """n = 3 of a prompt that ends inside its image (each choice computes the prompt's last
    position, an image token, in its own row): the tower runs once, and the choices are the
    answers of three requests seeded as they are (seed + i)."""
    processor = image_processor_for(str(llava_dir), load_hf_config(str(llava_dir)), None)
    assert processor is not None
    image = processor.preprocess(_image(40, 50, seed=1))
    prompt = processor.expand_placeholders([*_text(4, 1), IMAGE_TOKEN], [image])
    options: dict[str, Any] = dict(dtype="float32", kv_cache_memory_gb=0.01, enable_prefix_caching=prefix_cache)
    sampled = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    with in_process_workers(monkeypatch), LLM(str(llava_dir), **options) as llm:
        assert LocalWorker.last is not None
        batches = counted_embeds(LocalWorker.last.model)
        choices = llm.generate(prompt, SamplingParams(n=3, seed=7, **sampled), images=[[image]])[0].outputs
    assert batches == [1]
    with LLM(str(llava_dir), **options) as llm:
        separate = [llm.generate(prompt, SamplingParams(seed=seed, **sampled), images=[[image]])[0].outputs[0].token_ids
                    for seed in (7, 8, 9)]
    assert [c.token_ids for c in choices] == separate
    assert len({tuple(ids) for ids in separate}) > 1  # (seeded apart: a test of three different answers)
