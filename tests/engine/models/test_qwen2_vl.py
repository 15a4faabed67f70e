"""Qwen2-VL and Qwen2.5-VL against transformers (fp32, CPU, random weights): a tiny native-resolution
tower (4 px patches, 2 x 2 merge: a token per 8 x 8 px; Qwen2.5-VL's windows of 2 x 2 tokens
with one full-attention block) and a tiny Qwen2 with M-RoPE (sections 2 / 3 / 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from engine.models import load_model
from engine.multimodal import ImageInput, ImageProcessor, PromptImage, Qwen2VLImageProcessor, place_images
from engine.worker.mrope_positions import RowRope
from tests.engine.models.harness import Harness, rel_err

IMAGE_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 250, 251, 252, 253
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def tiny_qwen2_vl_config(family: str, **text_overrides: Any) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, eos_token_id=None,
        bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **text_overrides,
    )
    common: dict[str, Any] = dict(
        patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=4, initializer_range=0.2,
    )
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, architectures=[ARCHITECTURES[family]])
    if family == "qwen2_vl":
        vision = dict(common, depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(common, depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, window_size=16,
                  fullatt_block_indexes=[1], hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def save_tiny_qwen2_vl(path: Path, family: str, seed: int = 0, **text_overrides: Any) -> nn.Module:
    """The model and its image processor (min / max pixels for small images) saved to `path`."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_qwen2_vl_config(family, **text_overrides)
    model = getattr(transformers, ARCHITECTURES[family])(config).eval()
    with torch.no_grad():  # norms off their ones and zeros: a misplaced norm would show
        generator = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
    model.save_pretrained(path)
    transformers.Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=96 * 96
    ).save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, ImageProcessor]:
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_qwen2_vl(path, request.param)
    processor = Qwen2VLImageProcessor(str(path), hf.config, None)
    return hf, load_model(str(path), torch.float32, "cpu"), processor


def _image(width: int, height: int, seed: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _text(n: int, seed: int) -> list[int]:
    return torch.randint(0, VISION_START, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt(
    processor: ImageProcessor, pieces: list[int], sizes: list[tuple[int, int]], seed: int
) -> tuple[list[int], list[ImageInput], tuple[PromptImage, ...]]:
    """Text runs of the given lengths with an image (between vision start and end) after each of
    the first ones -> (prompt ids with each image's placeholders, the images, where they sit)."""
    images = [processor.preprocess(_image(w, h, seed + k)) for k, (w, h) in enumerate(sizes)]
    ids: list[int] = []
    for k, n in enumerate(pieces):
        ids += _text(n, seed + 10 * k)
        if k < len(images):
            ids += [VISION_START, IMAGE_TOKEN, VISION_END]
    ids = processor.expand_placeholders(ids, images)
    placed, _ = place_images(ids, images, IMAGE_TOKEN)
    return ids, images, placed


def _both_frames(patches: np.ndarray) -> np.ndarray:
    """[N, C * P * P] -> [N, C * T * P * P], the frame repeated over the temporal patch (T = 2)."""
    return np.repeat(patches.reshape(patches.shape[0], 3, 1, -1), 2, axis=2).reshape(patches.shape[0], -1)


def _hf_inputs(ids: list[int], images: list[ImageInput]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([ids])
    return dict(
        input_ids=input_ids, mm_token_type_ids=(input_ids == IMAGE_TOKEN).int(),
        pixel_values=torch.from_numpy(np.concatenate([_both_frames(image.pixel_values) for image in images])),
        image_grid_thw=torch.tensor([image.grid_thw for image in images]),
    )


def _harness(ours: nn.Module, placed: tuple[PromptImage, ...], row: int = 0, **kwargs: Any) -> Harness:
    harness = Harness(ours, **kwargs)
    harness.add_images(row, placed)
    return harness


# (widths x heights) 40 x 50 -> 40 x 48 px: 5 x 6 tokens; 64 x 31 -> 64 x 32: 8 x 4; 30 x 90 -> 32 x 88: 4 x 11
CASES = {"one image": ([5, 7], [(40, 50)]), "two images of different sizes": ([3, 4, 6], [(64, 31), (30, 90)])}


def test_image_tokens_and_grids(pair: tuple[Any, Any, ImageProcessor]) -> None:
    """grid_t * grid_h * grid_w / merge_size^2 placeholders an image, in the prompt's length."""
    _, _, processor = pair
    ids, images, _ = _prompt(processor, *CASES["two images of different sizes"], seed=1)
    assert [image.grid_thw for image in images] == [(1, 8, 16), (1, 22, 8)]
    assert [image.num_tokens for image in images] == [32, 44]
    assert images[0].pixel_values.shape == (128, 3 * 4 * 4)  # one frame of the two the processor gives
    given = processor._processor(images=[_image(64, 31, seed=1)], return_tensors="np")["pixel_values"]
    assert np.array_equal(_both_frames(images[0].pixel_values), given)
    assert len(ids) == 13 + 4 + 32 + 44 and ids.count(IMAGE_TOKEN) == 76


@pytest.mark.parametrize("case", sorted(CASES))
def test_mrope_positions_match_transformers(pair: tuple[Any, Any, ImageProcessor], case: str) -> None:
    """Every prompt position, in chunks that start inside an image, and the decode positions after
    the prompt (max position + 1 onwards, not the token count)."""
    hf, _, processor = pair
    ids, images, placed = _prompt(processor, *CASES[case], seed=2)
    inputs = _hf_inputs(ids, images)
    expected, deltas = hf.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    rope = RowRope.of(placed, 2)
    got = np.concatenate([rope.positions(start, n) for start, n in ((0, 10), (10, 7), (17, len(ids) - 17))], axis=1)
    assert np.array_equal(got, expected[:, 0].numpy())
    decode = rope.positions(len(ids) + 3, 2)
    assert np.array_equal(decode, np.broadcast_to(np.arange(2) + len(ids) + 3 + int(deltas[0, 0]), (3, 2)))
    assert int(expected.max()) + 1 == len(ids) + int(deltas[0, 0]) < len(ids)


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_prompt_logits_match_transformers(pair: tuple[Any, Any, ImageProcessor], case: str) -> None:
    hf, ours, processor = pair
    ids, images, placed = _prompt(processor, *CASES[case], seed=3)
    expected = hf(**_hf_inputs(ids, images)).logits[0]
    actual = _harness(ours, placed).prefill(0, ids)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_greedy_tokens_match_transformers(pair: tuple[Any, Any, ImageProcessor], case: str) -> None:
    hf, ours, processor = pair
    ids, images, placed = _prompt(processor, *CASES[case], seed=4)
    expected = hf.generate(**_hf_inputs(ids, images), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert _harness(ours, placed).generate(ids, 24) == expected[0, len(ids):].tolist()


def test_chunk_boundaries_inside_images(pair: tuple[Any, Any, ImageProcessor]) -> None:
    _, ours, processor = pair
    ids, _, placed = _prompt(processor, *CASES["two images of different sizes"], seed=6)
    whole = _harness(ours, placed).prefill(0, ids)
    # image 0 at 4..35, image 1 at 42..85: boundaries at 12 (inside 0), 36 and 42 (a chunk of the
    # text between them, at shifted positions), 60 and 80 (inside 1)
    assert ids[4:36] == [IMAGE_TOKEN] * 32 and ids[36:42].count(IMAGE_TOKEN) == 0 and ids[42:86] == [IMAGE_TOKEN] * 44
    chunked = _harness(ours, placed, seed=5).prefill(0, ids, chunk_sizes=[12, 24, 6, 18, 20])
    assert rel_err(chunked, whole) < 1e-5


def test_packed_batch_with_and_without_images_matches_alone(pair: tuple[Any, Any, ImageProcessor]) -> None:
    _, ours, processor = pair
    one = _prompt(processor, *CASES["one image"], seed=7)
    two = _prompt(processor, *CASES["two images of different sizes"], seed=8)
    text = _text(11, seed=9)
    alone = [_harness(ours, p[2]).generate(p[0], 6) for p in (one, two)]
    logits_alone = [_harness(ours, p[2]).prefill(0, p[0]) for p in (one, two)]
    text_alone = Harness(ours).prefill(0, text)
    harness = Harness(ours)
    harness.add_images(0, one[2])
    harness.add_images(2, two[2])
    harness.step([(0, one[0][:20])])  # row 0 stops inside its image, then finishes beside the others
    packed = harness.step([(0, one[0][20:]), (1, text), (2, two[0])])
    assert rel_err(packed[0], logits_alone[0][20:]) < 1e-5
    assert rel_err(packed[1], text_alone) < 1e-5
    assert rel_err(packed[2], logits_alone[1]) < 1e-5
    # decodes of the three rows together (the image rows at their shifted positions)
    tokens = [[int(packed[0][-1].argmax())], [], [int(packed[2][-1].argmax())]]
    for _ in range(5):
        out = harness.step([(0, tokens[0][-1:]), (2, tokens[2][-1:])])
        tokens[0].append(int(out[0][-1].argmax()))
        tokens[2].append(int(out[1][-1].argmax()))
    assert tokens[0] == alone[0] and tokens[2] == alone[1]


def _published_config(config: Any) -> dict[str, Any]:
    """`config` as the published checkpoints write it: the decoder's sizes at the top level, the
    M-RoPE sections in `rope_scaling` of type "mrope", the tower's channels as `in_chans`."""
    text = config.text_config.to_dict()
    flat = {name: text[name] for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size")}
    vision = config.vision_config.to_dict()
    vision["in_chans"] = vision.pop("in_channels")
    for name in ("rope_parameters", "model_type", "dtype", "transformers_version"):
        vision.pop(name, None)
    return dict(flat, architectures=config.architectures, model_type=config.model_type, rope_theta=10000.0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, vision_config=vision,
                image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                vision_end_token_id=VISION_END, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                use_sliding_window=False, torch_dtype="float32")


def test_checkpoint_and_config_of_the_published_layout(tmp_path: Path, pair: tuple[Any, Any, ImageProcessor]) -> None:
    """The published layout (`model.layers.*`, `visual.*`, `lm_head.*`; a flat config.json with
    `rope_scaling` of type "mrope") loads to the same model."""
    import json

    from safetensors.torch import save_file

    from engine.models.qwen2_vl import _rename

    assert _rename("model.language_model.layers.0.mlp.up_proj.weight") == "language_model.model.layers.0.mlp.up_proj.weight"
    assert _rename("model.layers.0.mlp.up_proj.weight") == "language_model.model.layers.0.mlp.up_proj.weight"
    assert _rename("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert _rename("visual.merger.mlp.0.weight") == "visual.merger.mlp.0.weight"
    assert _rename("lm_head.weight") == "language_model.lm_head.weight"
    hf, ours, processor = pair
    renamed = {}
    for name, tensor in hf.state_dict().items():
        for prefix, published in (("model.language_model.", "model."), ("model.visual.", "visual.")):
            if name.startswith(prefix):
                name = published + name[len(prefix):]
        renamed[name] = tensor.contiguous()
    assert "visual.merger.ln_q.weight" in renamed and "model.embed_tokens.weight" in renamed
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(_published_config(hf.config)))
    published = load_model(str(tmp_path), torch.float32, "cpu")
    ids, _, placed = _prompt(processor, *CASES["one image"], seed=10)
    assert torch.equal(_harness(published, placed).prefill(0, ids), _harness(ours, placed).prefill(0, ids))


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_random_model_maker_writes_what_both_load(tmp_path: Path, family: str) -> None:
    """scripts/make_random_qwen2_vl.py at tiny sizes, with the default model's tokenizer: the
    published config layout and transformers' tensor names, read alike by transformers and here."""
    import importlib.util

    import transformers

    from engine.models.loader import resolve_model
    from engine.multimodal import image_processor_for

    spec = importlib.util.spec_from_file_location("maker", Path(__file__).parents[3] / "scripts/make_random_qwen2_vl.py")
    assert spec is not None and spec.loader is not None
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=49216, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64, patch_size=4)  # (hidden_size: the merger's out)
    if family == "qwen2_5_vl":  # (hidden_size: the tower's width)
        vision.update(hidden_size=48, out_hidden_size=64, intermediate_size=48, window_size=16, fullatt_block_indexes=[1])
    maker.main(["--out", str(tmp_path), "--tokenizer-dir", resolve_model(None), "--set", f"vision_config={json.dumps(vision)}",
                *(f"--set={k}={json.dumps(v)}" for k, v in tiny.items()), *(["--qwen2_5"] if family == "qwen2_5_vl" else [])])
    hf = getattr(transformers, ARCHITECTURES[family]).from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(str(tmp_path), torch.float32, "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    processor = image_processor_for(str(tmp_path), hf.config, tokenizer)
    assert processor is not None and processor.placeholder == "<|vision_start|><|image_pad|><|vision_end|>"
    images = [processor.preprocess(_image(60, 44, seed=1))]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = processor.expand_placeholders(ids, images)
    placed, _ = place_images(ids, images, processor.image_token_id)
    inputs = _hf_inputs(ids, images)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == processor.image_token_id).int()
    assert rel_err(_harness(ours, placed).prefill(0, ids), hf(**inputs).logits[0]) < 1e-4
