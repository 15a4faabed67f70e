"""Images in prompts: preprocessing, placeholders and cache keys (server process), `PromptImage` (both).

A vision-language model (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`) reads each image as a
run of placeholder tokens (its `image_token_id`: `<image>`, `<|image_pad|>`), one per image
embedding its vision tower makes. The HTTP layer renders one placeholder per image (Qwen2-VL's
between its vision start and end tokens), tokenizes, and `ImageProcessor.expand_placeholders` widens each to the image's number of tokens,
so the prompt's ids (and `usage.prompt_tokens`) are the positions the model computes.

Preprocessing (resize, center crop, rescale, normalize: transformers' CLIP image processor,
its PIL backend; for LLaVA-NeXT its any-resolution tiles, engine/anyres.py; for Qwen2-VL its own,
which resizes within min / max pixels to a multiple of patch x merge size and cuts the patches:
grid_t * grid_h * grid_w / merge_size^2 tokens) runs here, in the server process, off the event loop, not in the workers: the
number of tokens an image takes must be known to build the prompt (for LLaVA 1.5 it is fixed,
for any-resolution models it depends on the image), the content hash that keys the prefix cache
is taken of what the model sees, and it runs once, not on every tensor-parallel rank. The
preprocessed pixels cross to the workers once per row, in the `NewRow` (`PromptImage`).

`place_images` finds each image's placeholder run in the prompt and gives the ids the prefix
cache keys the prompt by: the prompt with every placeholder of an image replaced by a negative
id derived from the image's content hash, so two prompts share cached K/V over an image only
when the image is the same.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from engine.anyres import check_select_strategy, grid_pinpoints, grid_shape, num_image_tokens

# Architectures whose prompts take images; Qwen2-VL's take them at their own resolution.
QWEN2_VL_ARCHITECTURES = frozenset({"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"})
VISION_ARCHITECTURES = frozenset(
    {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", *QWEN2_VL_ARCHITECTURES}
)
# The CLIP processor resizes the shorter side to the tower's size before cropping: a long thin
# image would become a huge array first (1 x 10 000 px: 336 x 3 360 000). Refused beyond this.
MAX_ASPECT_RATIO = 64
# Negative cache keys stay below the router's placeholder output token (-1).
_KEY_BITS = 60


@dataclass(frozen=True, slots=True, eq=False)
class PromptImage:
    """One image of a prompt: its preprocessed pixels and the placeholder positions they fill."""

    offset: int  # the first of its placeholder positions in the prompt
    num_tokens: int  # its positions: offset .. offset + num_tokens - 1
    pixel_values: np.ndarray  # float32, the vision tower's input: [3, H, W], or [tiles, 3, S, S] (any-resolution)
    image_size: tuple[int, int] = (0, 0)  # (height, width) as sent: any-resolution models unpad by it
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL: [patches, C * P * P] pixels and their grid (t, h, w)
    cache_key: int | None = None  # `ImageInput.cache_key`: the worker shares one embedding between rows by it


@dataclass(frozen=True, slots=True, eq=False)
class ImageInput:
    """One image preprocessed for the model."""

    pixel_values: np.ndarray  # float32, the vision tower's input: [3, H, W], or [tiles, 3, S, S] (any-resolution)
    num_tokens: int  # placeholder tokens it takes in the prompt
    cache_key: int  # negative, from the pixels' and size's hash: the prefix cache's id for its positions
    image_size: tuple[int, int] = (0, 0)  # (height, width) as sent
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL: [patches, C * P * P] pixels and their grid (t, h, w)


class ImageProcessor:
    """The model's image side in the server process (thread-safe: no state changes after init)."""

    def __init__(self, model_path: str, hf_config: Any, tokenizer: Any | None) -> None:
        vision = hf_config.vision_config
        self.image_token_id = int(getattr(hf_config, "image_token_id", None) or hf_config.image_token_index)
        # the placeholder's text (a model that ships no tokenizer takes token ids only)
        self.placeholder: str = tokenizer.convert_ids_to_tokens(self.image_token_id) if tokenizer else "<image>"
        self.patch_size = int(vision.patch_size)
        self.tower_size = int(getattr(vision, "image_size", 0))  # (Qwen2-VL's tower reads any size)
        # "default" drops the vision tower's class token, "full" keeps it
        self.extra_tokens = 1 if getattr(hf_config, "vision_feature_select_strategy", "default") == "full" else 0
        self._processor = self._load_processor(model_path, hf_config)
        if self.square_tiles:
            self._check_tile_size(int(vision.image_size))

    # The processor's pixels are squares (tiles) of the vision tower's image size (Qwen2-VL's are not).
    square_tiles: ClassVar[bool] = True

    def _check_tile_size(self, size: int) -> None:
        """ValueError when the processor makes pixels of another size than the tower's `size` (a
        preprocessor_config.json of another model): the tower could not read them."""
        from PIL import Image

        pixels = self._processor(images=[Image.new("RGB", (size, size))], return_tensors="np")["pixel_values"][0]
        height, width = pixels.shape[-2:]
        if (height, width) != (size, size):
            raise ValueError(f"the image processor (preprocessor_config.json) makes images of {height} x {width} px "
                             f"where the vision tower reads {size} x {size}")

    def _load_processor(self, model_path: str, hf_config: Any) -> Any:
        """transformers' image processor for the model."""
        return _clip_processor(model_path, int(hf_config.vision_config.image_size))

    def num_tokens(self, pixels: np.ndarray, image_size: tuple[int, int]) -> int:
        """The placeholder tokens of an image of `image_size` (height, width) preprocessed to `pixels`."""
        height, width = pixels.shape[-2:]
        return (height // self.patch_size) * (width // self.patch_size) + self.extra_tokens

    def preprocess(self, image: Any) -> ImageInput:
        """A Pillow RGB image -> its pixels as the model reads them, its token count and cache key;
        ValueError for a side more than `MAX_ASPECT_RATIO` times the other."""
        image_size = _checked_size(image)
        pixels = np.ascontiguousarray(self._processor(images=[image], return_tensors="np")["pixel_values"][0],
                                      dtype=np.float32)
        # (the size too: an any-resolution model's tokens depend on it, beyond the pixels)
        return ImageInput(pixels, self.num_tokens(pixels, image_size), _cache_key(pixels, image_size), image_size)

    def expand_placeholders(self, prompt_ids: list[int], images: Sequence[ImageInput]) -> list[int]:
        """Each placeholder token, in order, widened to its image's number of tokens; ValueError
        naming `messages` when the prompt's placeholders and the images differ in number."""
        found = prompt_ids.count(self.image_token_id)
        if found != len(images):
            raise ValueError(
                f"the prompt has {found} image placeholders ({self.placeholder!r}) for {len(images)} images",
                "messages",
            )
        out: list[int] = []
        it = iter(images)
        for token in prompt_ids:
            out.extend([token] * next(it).num_tokens if token == self.image_token_id else (token,))
        return out

    def profile_images(self, max_tokens: int) -> list[ImageInput]:
        """The heaviest images one step may embed when the router bounds a step's image tokens by
        `max_tokens` (engine/router/image_budget.py), for the worker's GPU memory profile: the
        largest image this processor makes, as many times as such images fit the bound, at least
        once (an image larger than the bound runs alone)."""
        from PIL import Image

        width, height = self._largest_size()
        largest = self.preprocess(Image.new("RGB", (width, height), (127, 127, 127)))
        return [largest] * max(1, self._profile_count(max_tokens, largest.num_tokens))

    def _largest_size(self) -> tuple[int, int]:
        """(width, height) of an image that takes the most tokens and pixels (any: CLIP's are all one size)."""
        return self.tower_size, self.tower_size

    def _profile_count(self, max_tokens: int, largest_tokens: int) -> int:
        """How many of the largest images fill a bound of `max_tokens` (all images take as many tokens)."""
        return max_tokens // largest_tokens


def _checked_size(image: Any) -> tuple[int, int]:
    """A Pillow image's (height, width); ValueError for a side more than `MAX_ASPECT_RATIO` times the other."""
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"a {width}x{height} image: one side may be at most {MAX_ASPECT_RATIO} times the other")
    return height, width


def _cache_key(pixels: np.ndarray, extra: object) -> int:
    """A negative id from the pixels' (and `extra`'s) SHA-256: the prefix cache's for their positions."""
    digest = hashlib.sha256(pixels.tobytes() + repr((pixels.shape, extra)).encode()).digest()
    return -2 - (int.from_bytes(digest[:8], "little") >> (64 - _KEY_BITS))


def _clip_processor(model_path: str, image_size: int) -> Any:
    """The directory's CLIP image processor (preprocessor_config.json), else CLIP's defaults at the
    vision tower's image size. The PIL backend: the same pixels without torchvision."""
    import transformers

    # transformers 5's PIL backend; in transformers 4 the slow processor is the PIL one
    Processor: Any = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    if os.path.isfile(os.path.join(model_path, "preprocessor_config.json")):
        return Processor.from_pretrained(model_path)
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


class AnyResImageProcessor(ImageProcessor):
    """LLaVA-NeXT's image side in the server process: transformers' LLaVA-NeXT image processor
    (pixels [1 + rows * cols, 3, S, S]: the base tile, then the grid's), the tile grid from the
    model's `image_grid_pinpoints`, tokens that depend on the image's size (engine/anyres.py)."""

    def __init__(self, model_path: str, hf_config: Any, tokenizer: Any | None) -> None:
        check_select_strategy(hf_config)
        self.pinpoints = grid_pinpoints(hf_config)
        self.tile_size = int(hf_config.vision_config.image_size)
        super().__init__(model_path, hf_config, tokenizer)

    def _load_processor(self, model_path: str, hf_config: Any) -> Any:
        """The directory's processor (preprocessor_config.json), else its defaults at the tower's
        size; the model's pinpoints either way, so that the tiles are those the model expects."""
        import transformers

        # transformers 5's PIL backend; in transformers 4 the slow processor is the PIL one
        Processor: Any = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
        pinpoints = [list(p) for p in self.pinpoints]
        if os.path.isfile(os.path.join(model_path, "preprocessor_config.json")):
            return Processor.from_pretrained(model_path, image_grid_pinpoints=pinpoints)
        size = self.tile_size
        return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                         image_grid_pinpoints=pinpoints)

    def num_tokens(self, pixels: np.ndarray, image_size: tuple[int, int]) -> int:
        rows, cols = grid_shape(image_size, self.pinpoints, self.tile_size)
        if pixels.ndim != 4 or pixels.shape[0] != 1 + rows * cols:
            raise ValueError(f"the image processor made {pixels.shape[0]} tiles where the model reads {1 + rows * cols}")
        return num_image_tokens(image_size, self.pinpoints, self.tile_size, self.patch_size)

    def _largest_size(self) -> tuple[int, int]:
        """The pinpoint with the most tiles (then pixels): an image of that size fills its whole grid."""
        height, width = max(self.pinpoints, key=lambda p: (math.prod(grid_shape(p, self.pinpoints, self.tile_size)), p[0] * p[1]))
        return width, height

    def _profile_count(self, max_tokens: int, largest_tokens: int) -> int:
        """Any image takes the base tile's tokens and at least one row of its grid's, but as many
        tiles as the largest when its grid is as large (a long, thin image keeps few rows of its
        map): the tower's work is counted by the most tiles the bound can bring."""
        return max_tokens // ((self.tile_size // self.patch_size) ** 2 + 1)


class Qwen2VLImageProcessor(ImageProcessor):
    """Qwen2-VL's and Qwen2.5-VL's image side in the server process: transformers' Qwen2-VL image
    processor (the directory's min / max pixels), patches [N, C * P * P] with their grid (t, h, w),
    t * h * w / merge_size^2 tokens; an image stands as its vision start, pad and end tokens."""

    square_tiles: ClassVar[bool] = False  # (its patch sizes are checked instead)

    def __init__(self, model_path: str, hf_config: Any, tokenizer: Any | None) -> None:
        vision = hf_config.vision_config
        self.merge_size = int(vision.spatial_merge_size)
        self.frame_shape = (int(vision.in_channels), int(vision.temporal_patch_size))
        super().__init__(model_path, hf_config, tokenizer)
        if tokenizer:  # (also inline in a template for text content)
            self.placeholder = "".join(tokenizer.convert_ids_to_tokens(
                [int(hf_config.vision_start_token_id), self.image_token_id, int(hf_config.vision_end_token_id)]))

    def _load_processor(self, model_path: str, hf_config: Any) -> Any:
        """The directory's processor (preprocessor_config.json), else the defaults at the tower's
        patch sizes; the PIL backend. ValueError when its patch sizes are not the tower's."""
        import transformers

        vision = hf_config.vision_config
        Processor: Any = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
        if os.path.isfile(os.path.join(model_path, "preprocessor_config.json")):
            processor = Processor.from_pretrained(model_path)
        else:
            processor = Processor(patch_size=int(vision.patch_size), temporal_patch_size=int(vision.temporal_patch_size),
                                  merge_size=self.merge_size)
        ours = (int(vision.patch_size), int(vision.temporal_patch_size), self.merge_size)
        theirs = (int(processor.patch_size), int(processor.temporal_patch_size), int(processor.merge_size))
        if ours != theirs:
            raise ValueError(f"the image processor's patch, temporal patch and merge sizes {theirs} are not the "
                             f"vision tower's {ours}")
        return processor

    def preprocess(self, image: Any) -> ImageInput:
        image_size = _checked_size(image)
        out = self._processor(images=[image], return_tensors="np")
        # The processor repeats a still image over the temporal patch ([N, C * T * P * P]): one
        # frame is kept (half the bytes held and sent to every rank), the tower repeats it.
        patches = out["pixel_values"]
        channels, temporal = self.frame_shape
        frames = patches.reshape(patches.shape[0], channels, temporal, -1)
        pixels = np.ascontiguousarray(frames[:, :, 0].reshape(patches.shape[0], -1), dtype=np.float32)
        t, h, w = (int(n) for n in out["image_grid_thw"][0])
        return ImageInput(pixels, t * h * w // self.merge_size**2, _cache_key(pixels, (t, h, w)), image_size, (t, h, w))

    def _largest_size(self) -> tuple[int, int]:
        """An image of the processor's max pixels, both sides multiples of patch x merge size
        (which it keeps as they are): the most tokens an image can take."""
        size = self._processor.size
        max_pixels = getattr(self._processor, "max_pixels", None) or (
            size["longest_edge"] if isinstance(size, dict) else size.longest_edge
        )
        unit = self.patch_size * self.merge_size
        area = int(max_pixels) // unit**2  # in tokens
        rows = math.isqrt(area)
        return (area // rows) * unit, rows * unit

    def _profile_count(self, max_tokens: int, largest_tokens: int) -> int:
        """Tokens and patches go together (merge_size^2 patches a token): the largest images up to
        the bound, rounded up (a smaller image may fill the rest)."""
        return -(-max_tokens // largest_tokens)


def image_processor_for(model_path: str, hf_config: Any, tokenizer: Any | None) -> ImageProcessor | None:
    """The model's image processor; None for a model that reads text only."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures or architectures[0] not in VISION_ARCHITECTURES:
        return None
    if architectures[0] == "LlavaNextForConditionalGeneration":
        return AnyResImageProcessor(model_path, hf_config, tokenizer)
    if architectures[0] in QWEN2_VL_ARCHITECTURES:
        return Qwen2VLImageProcessor(model_path, hf_config, tokenizer)
    return ImageProcessor(model_path, hf_config, tokenizer)


def place_images(
    prompt_ids: list[int], images: Sequence[ImageInput], image_token_id: int | None
) -> tuple[tuple[PromptImage, ...], list[int] | None]:
    """The images at their placeholder runs, in order -> (what the workers get, the ids the prefix
    cache keys the prompt by; None without images). ValueError naming `prompt` for image tokens
    without images, `images` when the placeholders do not make one contiguous run of the right
    length per image."""
    positions = [p for p, t in enumerate(prompt_ids) if t == image_token_id] if image_token_id is not None else []
    if not images and not positions:
        return (), None
    if image_token_id is None:
        raise ValueError("this model does not take images", "images")
    if not images:  # the text names the image token itself
        raise ValueError(f"the prompt holds {len(positions)} image tokens (id {image_token_id}) but no image", "prompt")
    if len(positions) != sum(image.num_tokens for image in images):
        raise ValueError(
            f"the prompt has {len(positions)} image tokens where its {len(images)} images take "
            f"{sum(image.num_tokens for image in images)}", "images",
        )
    placed, keys, start = [], list(prompt_ids), 0
    for image in images:
        run = positions[start : start + image.num_tokens]
        start += image.num_tokens
        if run[-1] - run[0] + 1 != image.num_tokens:
            raise ValueError("an image's placeholder tokens must be contiguous in the prompt", "images")
        placed.append(
            PromptImage(run[0], image.num_tokens, image.pixel_values, image.image_size, image.grid_thw, image.cache_key)
        )
        keys[run[0] : run[-1] + 1] = [image.cache_key] * image.num_tokens
    return tuple(placed), keys
