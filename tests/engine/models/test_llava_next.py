"""LLaVA-NeXT against transformers' LlavaNextForConditionalGeneration (fp32, CPU, random weights):
the tiny CLIP tower and Llama of test_llava.py, images read as a base tile and a grid of 30 px
tiles chosen from `image_grid_pinpoints` (25 features a tile), unpadded, a newline a row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from engine.models import load_model
from engine.multimodal import AnyResImageProcessor, ImageInput, image_processor_for
from tests.engine.models.harness import Harness, rel_err
from tests.engine.models.test_llava import _harness, _image, _prompt, _text, save_tiny_llava

Pair = tuple[nn.Module, nn.Module, AnyResImageProcessor]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    path = tmp_path_factory.mktemp("llava-next")
    hf = save_tiny_llava(path, next_=True)
    processor = image_processor_for(str(path), hf.config, None)
    assert isinstance(processor, AnyResImageProcessor)
    return hf, load_model(str(path), torch.float32, "cpu"), processor


def _hf_inputs(images: list[ImageInput]) -> dict[str, torch.Tensor]:
    """transformers' image inputs: tiles padded to the most any image has, the images' sizes."""
    most = max(image.pixel_values.shape[0] for image in images)
    padded = [np.pad(i.pixel_values, ((0, most - i.pixel_values.shape[0]), (0, 0), (0, 0), (0, 0))) for i in images]
    return {"pixel_values": torch.from_numpy(np.stack(padded)),
            "image_sizes": torch.tensor([image.image_size for image in images])}


# (width, height): wide, tall, square, small, and thin ones whose unpadding keeps a row or a column
SIZES = [(70, 50), (64, 31), (30, 90), (45, 45), (40, 91), (12, 9), (200, 7), (5, 160), (33, 61), (91, 40), (300, 300)]


@torch.inference_mode()
def test_token_counts_match_transformers(pair: Pair) -> None:
    """Each image's placeholder tokens are the embeddings transformers makes of it, and what its
    processor would put in the prompt."""
    from transformers import LlavaNextProcessor

    hf, _, processor = pair
    images = [processor.preprocess(_image(w, h, seed=k)) for k, (w, h) in enumerate(SIZES)]
    features = hf.model.get_image_features(**_hf_inputs(images), return_dict=True).pooler_output
    assert [image.num_tokens for image in images] == [f.shape[0] for f in features]
    assert len({image.num_tokens for image in images}) > 5  # the sizes take different numbers of tokens
    assert [image.pixel_values.shape[0] for image in images][:4] == [5, 4, 4, 5]  # base + 2x2, 1x3, 3x1, 2x2
    hf_processor = LlavaNextProcessor(processor._processor, _image_token_tokenizer(), patch_size=6,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
    counts = hf_processor._get_num_multimodal_tokens([(h, w) for w, h in SIZES])["num_image_tokens"]
    assert counts == [image.num_tokens for image in images]


def _image_token_tokenizer() -> Any:
    """A tokenizer that knows `<image>` (LlavaNextProcessor looks its id up)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, "<unk>")))


CASES = {
    "one image": ([5, 7], [(70, 50)]),
    "three images of different sizes and aspect ratios": ([3, 4, 6, 2], [(64, 31), (40, 91), (45, 45)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_prompt_logits_match_transformers(pair: Pair, case: str) -> None:
    hf, ours, processor = pair
    ids, images, placed = _prompt(processor, *CASES[case], seed=1)
    assert len(ids) == sum(CASES[case][0]) + sum(image.num_tokens for image in images)
    expected = hf(input_ids=torch.tensor([ids]), **_hf_inputs(images)).logits[0]
    actual = _harness(ours, placed).prefill(0, ids)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_greedy_tokens_match_transformers(pair: Pair, case: str) -> None:
    hf, ours, processor = pair
    ids, images, placed = _prompt(processor, *CASES[case], seed=2)
    expected = hf.generate(
        input_ids=torch.tensor([ids]), **_hf_inputs(images), max_new_tokens=24, min_new_tokens=24, do_sample=False,
    )[0, len(ids):].tolist()
    assert _harness(ours, placed).generate(ids, 24) == expected


def test_packed_batch_with_and_without_images_matches_alone(pair: Pair) -> None:
    """Rows with images of different tile counts, a text-only row, a chunk ending inside an image."""
    _, ours, processor = pair
    one = _prompt(processor, *CASES["one image"], seed=4)
    three = _prompt(processor, *CASES["three images of different sizes and aspect ratios"], seed=5)
    text = _text(11, seed=6)
    alone = [_harness(ours, p[2]).prefill(0, p[0]) for p in (one, three)]
    text_alone = Harness(ours).prefill(0, text)
    harness = Harness(ours)
    harness.add_images(0, one[2])
    harness.add_images(2, three[2])
    harness.step([(0, one[0][:40])])  # row 0 stops inside its image, then finishes beside the others
    packed = harness.step([(0, one[0][40:]), (1, text), (2, three[0])])
    assert rel_err(packed[0], alone[0][40:]) < 1e-5
    assert rel_err(packed[1], text_alone) < 1e-5
    assert rel_err(packed[2], alone[1]) < 1e-5
    chunked = _harness(ours, three[2], seed=3).prefill(0, three[0], chunk_sizes=[50, 100, 7])
    assert rel_err(chunked, alone[1]) < 1e-5


def test_checkpoint_names_of_both_layouts(tmp_path: Path, pair: Pair) -> None:
    """The saved layout (`image_newline`, `language_model.model.*`) and the in-memory one
    (`model.image_newline`, `model.*`, `lm_head.*`) load to the same model."""
    from safetensors.torch import save_file

    from engine.models.llava import _rename

    assert _rename("model.image_newline") == "image_newline" == _rename("image_newline")
    hf, ours, processor = pair
    state = hf.state_dict()
    assert "model.image_newline" in state and "model.language_model.layers.0.mlp.up_proj.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    hf.config.save_pretrained(tmp_path)
    in_memory = load_model(str(tmp_path), torch.float32, "cpu")
    assert torch.equal(in_memory.image_newline, hf.model.image_newline)
    ids, _, placed = _prompt(processor, *CASES["one image"], seed=9)
    assert torch.equal(_harness(in_memory, placed).prefill(0, ids), _harness(ours, placed).prefill(0, ids))


@torch.inference_mode()
def test_several_feature_layers(tmp_path: Path) -> None:
    """`vision_feature_layer` a list: the layers' states side by side, into a wider projector."""
    hf = save_tiny_llava(tmp_path, llava_overrides={"vision_feature_layer": [-4, -1]}, next_=True)
    ours = load_model(str(tmp_path), torch.float32, "cpu")
    processor = image_processor_for(str(tmp_path), hf.config, None)
    assert processor is not None
    ids, images, placed = _prompt(processor, [5, 7], [(91, 40)], seed=11)
    expected = hf(input_ids=torch.tensor([ids]), **_hf_inputs(images)).logits[0]
    assert rel_err(_harness(ours, placed).prefill(0, ids), expected) < 1e-4


def test_class_token_kept_is_refused(tmp_path: Path) -> None:
    """"full" keeps the tower's class token, which leaves the tiles' features no grid: refused
    when the model loads and when the server reads its images, naming the setting."""
    from transformers import LlavaNextConfig

    from engine.models.llava import LlavaNextForConditionalGeneration

    config = LlavaNextConfig.from_dict({**save_tiny_llava(tmp_path, next_=True).config.to_dict(),
                                        "vision_feature_select_strategy": "full"})
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full'"):
        LlavaNextForConditionalGeneration(config)
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full'"):
        image_processor_for(str(tmp_path), config, None)


def test_the_directorys_image_processor_is_used(tmp_path: Path) -> None:
    """A `preprocessor_config.json` (here with its own normalization) is the processor the server
    runs, with the model's `image_grid_pinpoints` (the tiles the model reads) over the file's."""
    from transformers import LlavaNextImageProcessorPil

    hf = save_tiny_llava(tmp_path, next_=True)
    LlavaNextImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30},
                               image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4],
                               image_grid_pinpoints=[[30, 30]]).save_pretrained(tmp_path)
    processor = image_processor_for(str(tmp_path), hf.config, None)
    assert processor is not None
    image = _image(70, 50, seed=3)
    ours = processor.preprocess(image)
    theirs = LlavaNextImageProcessorPil.from_pretrained(tmp_path, image_grid_pinpoints=hf.config.image_grid_pinpoints)(
        images=[image], return_tensors="np")["pixel_values"][0]
    assert ours.pixel_values.shape == (5, 3, 30, 30) and np.array_equal(ours.pixel_values, theirs)
    defaults = image_processor_for(str(tmp_path / "missing"), hf.config, None)
    assert defaults is not None and not np.allclose(defaults.preprocess(image).pixel_values, theirs)
