"""The worker's memory profile of a vision-language model (engine/worker/kv_pool.py): the step it
measures embeds the heaviest images the router lets one step embed (`max_image_tokens_per_step`)
and holds their embeddings through the forward pass. Measured on the CPU with torch's profiler
(the GPU's allocator statistics are what the worker reads there), real tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.model_config import ModelConfig
from engine.models.loader import load_hf_config, load_model
from engine.worker.kv_pool import KVLayout, profile_activations, profile_images_of
from engine.worker.sampler import Sampler
from tests.engine.models.test_llava import save_tiny_llava
from tests.engine.models.test_qwen2_vl import save_tiny_qwen2_vl

STEP_TOKENS = 64


class CpuPeakMemory:
    """The peak of the CPU allocations made between `start` and `peak`, from torch's profiler."""

    def start(self) -> None:
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def peak(self) -> int:
        self.prof.__exit__(None, None, None)
        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        save_tiny_llava(path)
    else:
        save_tiny_qwen2_vl(path, "qwen2_vl")
    return path


def _profile(model_dir: Path, model: Any, max_image_tokens: int, with_images: bool) -> tuple[int, int]:
    """(the profiled peak, the images embedded)"""
    hf_config = load_hf_config(str(model_dir))
    shape = ModelConfig.from_hf_config(hf_config)
    config = EngineConfig(device="cpu", dtype="float32", max_num_batched_tokens=STEP_TOKENS, max_num_seqs=4,
                          max_image_tokens_per_step=max_image_tokens).resolve(max_position_embeddings=256)
    images = profile_images_of(str(model_dir), hf_config, config.max_image_tokens_per_step) if with_images else []
    layout = KVLayout.for_model(shape, 1, torch.float32)
    embedded: list[int] = []
    embed_images = model.embed_images  # the real tower, its batches counted
    model.embed_images = lambda pixels, *args: embedded.append(len(args[0])) or embed_images(pixels, *args)
    try:
        peak = profile_activations(config, layout, model, Sampler(seed=0), images, meter=CpuPeakMemory())
    finally:
        del model.embed_images
    assert len(embedded) <= 1  # every image in one batch, as a step embeds its new images
    return peak, sum(embedded)


def test_the_profile_embeds_the_most_images_a_step_may_and_counts_them(model_dir: Path) -> None:
    model = load_model(str(model_dir), torch.float32, "cpu")
    hidden = int(load_hf_config(str(model_dir)).text_config.hidden_size)
    text_peak, none = _profile(model_dir, model, 100, with_images=False)
    peak, num_images = _profile(model_dir, model, 100, with_images=True)
    larger_peak, more_images = _profile(model_dir, model, 400, with_images=True)
    assert none == 0
    if (model_dir / "preprocessor_config.json").exists():  # Qwen2-VL: 144-token images at most
        assert (num_images, more_images) == (1, 3)  # (one larger than the bound runs alone)
        tokens = 144
    else:  # LLaVA 1.5: 25 tokens an image
        assert (num_images, more_images) == (100 // 25, 400 // 25)
        tokens = 25
        assert larger_peak > peak  # (one tower batch: the more images, the more activations)
    # The embeddings are held through the forward pass, and the worker's recent ones (up to the
    # bound) beside them: on top of the text step's peak
    assert peak >= text_peak + (num_images * tokens + 100) * hidden * 4
    assert larger_peak >= text_peak + (more_images * tokens + 400) * hidden * 4
