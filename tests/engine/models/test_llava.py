"""LLaVA 1.5 against transformers' LlavaForConditionalGeneration (fp32, CPU, random weights):
a tiny CLIP vision tower (30 px images, 6 px patches: 25 tokens an image) and a tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from engine.models import load_model
from engine.multimodal import ImageInput, ImageProcessor, PromptImage, place_images
from tests.engine.models.harness import Harness, rel_err

IMAGE_TOKEN = 255
IMAGE_SIZE, PATCH = 30, 6
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2
# LLaVA-NeXT's grid resolutions (height, width): the published ones' shapes in tiles of IMAGE_SIZE
NEXT_PINPOINTS = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]


def tiny_llava_config(llava_overrides: dict[str, Any] | None = None, next_: bool = False, **text_overrides: Any) -> Any:
    """A tiny LLaVA 1.5 config, or LLaVA-NeXT's (`next_`) with the same tower and decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH, projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, **text_overrides,
    )
    if next_:
        return LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_grid_pinpoints=NEXT_PINPOINTS,
            architectures=["LlavaNextForConditionalGeneration"], **(llava_overrides or {}),
        )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
        architectures=["LlavaForConditionalGeneration"], **(llava_overrides or {}),
    )


def save_tiny_llava(
    path: Path, seed: int = 0, llava_overrides: dict[str, Any] | None = None, next_: bool = False,
    **text_overrides: Any,
) -> nn.Module:
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model_class = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    model = model_class(tiny_llava_config(llava_overrides, next_, **text_overrides)).eval()
    with torch.no_grad():  # the projector and tower at the language model's scale: peaked logits
        for name, param in model.named_parameters():
            if "multi_modal_projector" in name and name.endswith("weight"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, ImageProcessor]:
    path = tmp_path_factory.mktemp("llava")
    hf = save_tiny_llava(path)
    processor = ImageProcessor(str(path), hf.config, None)
    return hf, load_model(str(path), torch.float32, "cpu"), processor


def _image(width: int, height: int, seed: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _text(n: int, seed: int) -> list[int]:
    return torch.randint(0, IMAGE_TOKEN, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt(
    processor: ImageProcessor, pieces: list[int], sizes: list[tuple[int, int]], seed: int
) -> tuple[list[int], list[ImageInput], tuple[PromptImage, ...]]:
    """Text runs of the given lengths with an image between each two -> (prompt ids with each
    image's placeholders, the images, where they sit)."""
    images = [processor.preprocess(_image(w, h, seed + k)) for k, (w, h) in enumerate(sizes)]
    ids: list[int] = []
    for k, n in enumerate(pieces):
        ids += _text(n, seed + 10 * k)
        if k < len(images):
            ids.append(IMAGE_TOKEN)
    ids = processor.expand_placeholders(ids, images)
    placed, _ = place_images(ids, images, IMAGE_TOKEN)
    return ids, images, placed


def _pixels(images: list[ImageInput]) -> torch.Tensor:
    return torch.from_numpy(np.stack([image.pixel_values for image in images]))


def _harness(ours: nn.Module, placed: tuple[PromptImage, ...], row: int = 0, **kwargs: Any) -> Harness:
    harness = Harness(ours, **kwargs)
    harness.add_images(row, placed)
    return harness


CASES = {"one image": ([5, 7], [(40, 50)]), "two images of different sizes": ([3, 4, 6], [(64, 31), (30, 90)])}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_prompt_logits_match_transformers(pair: tuple[nn.Module, nn.Module, ImageProcessor], case: str) -> None:
    hf, ours, processor = pair
    ids, images, placed = _prompt(processor, *CASES[case], seed=1)
    assert len(ids) == sum(CASES[case][0]) + TOKENS_PER_IMAGE * len(images)
    expected = hf(input_ids=torch.tensor([ids]), pixel_values=_pixels(images)).logits[0]
    actual = _harness(ours, placed).prefill(0, ids)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_greedy_tokens_match_transformers(pair: tuple[nn.Module, nn.Module, ImageProcessor], case: str) -> None:
    hf, ours, processor = pair
    ids, images, placed = _prompt(processor, *CASES[case], seed=2)
    expected = hf.generate(
        input_ids=torch.tensor([ids]), pixel_values=_pixels(images), max_new_tokens=24, min_new_tokens=24,
        do_sample=False,
    )[0, len(ids):].tolist()
    assert _harness(ours, placed).generate(ids, 24) == expected


def test_chunk_boundaries_inside_images(pair: tuple[nn.Module, nn.Module, ImageProcessor]) -> None:
    _, ours, processor = pair
    ids, _, placed = _prompt(processor, *CASES["two images of different sizes"], seed=3)
    whole = _harness(ours, placed).prefill(0, ids)
    # image 0 at 3..27, image 1 at 32..56: boundaries at 10 (inside 0), 30, 40 and 50 (inside 1)
    chunked = _harness(ours, placed, seed=5).prefill(0, ids, chunk_sizes=[10, 20, 10, 10])
    assert rel_err(chunked, whole) < 1e-5


def test_packed_batch_with_and_without_images_matches_alone(
    pair: tuple[nn.Module, nn.Module, ImageProcessor],
) -> None:
    _, ours, processor = pair
    one = _prompt(processor, *CASES["one image"], seed=4)
    two = _prompt(processor, *CASES["two images of different sizes"], seed=5)
    text = _text(11, seed=6)
    alone = [_harness(ours, p[2]).prefill(0, p[0]) for p in (one, two)]
    text_alone = Harness(ours).prefill(0, text)
    harness = Harness(ours)
    harness.add_images(0, one[2])
    harness.add_images(2, two[2])
    harness.step([(0, one[0][:8])])  # row 0 stops inside its image, then finishes beside the others
    packed = harness.step([(0, one[0][8:]), (1, text), (2, two[0])])
    assert rel_err(packed[0], alone[0][8:]) < 1e-5
    assert rel_err(packed[1], text_alone) < 1e-5
    assert rel_err(packed[2], alone[1]) < 1e-5


def test_different_images_give_different_logits_and_cache_keys(
    pair: tuple[nn.Module, nn.Module, ImageProcessor],
) -> None:
    """The same text with another image: other logits after the image, other prefix-cache keys
    from the image's first position on (and the same before it); the same image: the same keys."""
    _, ours, processor = pair
    ids_a, images_a, placed_a = _prompt(processor, [5, 7], [(40, 50)], seed=7)
    _, images_b, placed_b = _prompt(processor, [5, 7], [(40, 50)], seed=8)
    ids_b = list(ids_a)  # the same text around another image
    keys_a = place_images(ids_a, images_a, IMAGE_TOKEN)[1]
    keys_b = place_images(ids_b, images_b, IMAGE_TOKEN)[1]
    assert keys_a is not None and keys_b is not None
    assert keys_a[:5] == keys_b[:5] == ids_a[:5] and keys_a[5] != keys_b[5] and keys_a[5] < -1
    again = processor.preprocess(_image(40, 50, 7))
    assert place_images(ids_a, [again], IMAGE_TOKEN)[1] == keys_a
    logits_a = _harness(ours, placed_a).prefill(0, ids_a)
    logits_b = _harness(ours, placed_b).prefill(0, ids_b)
    assert rel_err(logits_a[:5], logits_b[:5]) < 1e-6
    assert rel_err(logits_a[5:], logits_b[5:]) > 1e-2


def test_checkpoint_names_of_every_layout(tmp_path: Path, pair: tuple[nn.Module, nn.Module, ImageProcessor]) -> None:
    """The published layout (`vision_tower.vision_model.*`, `language_model.model.*`) and the
    in-memory one (`model.*`, `lm_head.*`) load to the same model."""
    from engine.models.llava import _rename

    assert _rename("model.language_model.layers.0.mlp.up_proj.weight") == "language_model.model.layers.0.mlp.up_proj.weight"
    assert _rename("lm_head.weight") == "language_model.lm_head.weight"
    assert _rename("language_model.lm_head.weight") == "language_model.lm_head.weight"
    assert _rename("vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias") == "vision_tower.encoder.layers.1.mlp.fc1.bias"
    assert _rename("model.multi_modal_projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"
    hf, ours, processor = pair
    assert len(ours.vision_tower.encoder.layers) == 2  # feature layer -2 of 3: the last one is not built
    # The published layout, written out: the same logits
    from safetensors.torch import save_file

    published_prefixes = {"model.vision_tower.": "vision_tower.vision_model.", "model.language_model.":
                          "language_model.model.", "model.multi_modal_projector.": "multi_modal_projector.",
                          "lm_head.": "language_model.lm_head."}
    renamed = {}
    for name, tensor in hf.state_dict().items():  # (the in-memory names)
        prefix = next(p for p in published_prefixes if name.startswith(p))
        renamed[published_prefixes[prefix] + name[len(prefix):]] = tensor
    assert "vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias" in renamed and "language_model.lm_head.weight" in renamed
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp_path / "model.safetensors"))
    hf.config.save_pretrained(tmp_path)
    published = load_model(str(tmp_path), torch.float32, "cpu")
    ids, _, placed = _prompt(processor, *CASES["one image"], seed=9)
    assert torch.equal(_harness(published, placed).prefill(0, ids), _harness(ours, placed).prefill(0, ids))


@torch.inference_mode()
def test_several_feature_layers_and_the_class_token_kept(tmp_path: Path) -> None:
    """`vision_feature_layer` a list (the layers' states side by side, into a wider projector) and
    the "full" strategy (the class token kept: 26 tokens an image)."""
    hf = save_tiny_llava(tmp_path, llava_overrides={"vision_feature_layer": [-4, -1],
                                                    "vision_feature_select_strategy": "full"})
    ours = load_model(str(tmp_path), torch.float32, "cpu")
    processor = ImageProcessor(str(tmp_path), hf.config, None)
    ids, images, placed = _prompt(processor, [5, 7], [(40, 50)], seed=11)
    assert images[0].num_tokens == TOKENS_PER_IMAGE + 1
    expected = hf(input_ids=torch.tensor([ids]), pixel_values=_pixels(images)).logits[0]
    assert rel_err(_harness(ours, placed).prefill(0, ids), expected) < 1e-4
