"""Any-resolution images (LLaVA-NeXT): the tile grid, the unpadded feature map, the token count.

An image of (height, width) pixels is read at the resolution of `image_grid_pinpoints` that keeps
the most of its pixels with the least padding (transformers' `select_best_resolution`): resized
into it with its aspect ratio kept, padded to it (centred), and cut into a grid of tiles of the
vision tower's `image_size`, row by row. The tower reads the image resized whole (the "base"
tile) and each grid tile. The grid tiles' features are put back side by side into one feature
map, the rows or columns that only saw padding are cut off ("unpadding"), and a learned
`image_newline` embedding ends each remaining row. An image's tokens: the base tile's features,
then the unpadded map row by row, each row followed by its newline.

Both processes use this: the server's `AnyResImageProcessor` (engine/multimodal.py) counts an
image's placeholder tokens with it (the prompt, and `usage.prompt_tokens`, hold one per token),
and the model (engine/models/llava.py `LlavaNextForConditionalGeneration`) lays the features out
with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_select_strategy(config: Any) -> None:
    """ValueError for `vision_feature_select_strategy: "full"`: a CLIP tower's class token in each
    tile's features leaves them no square grid to put side by side (transformers cannot run it either)."""
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(
            f"LLaVA-NeXT with vision_feature_select_strategy {strategy!r} is not supported: the tiles' features "
            "make a grid only without the vision tower's class token ('default')"
        )


def grid_pinpoints(config: Any) -> list[tuple[int, int]]:
    """The model's candidate resolutions, (height, width) each."""
    return [(int(h), int(w)) for h, w in config.image_grid_pinpoints]


def grid_shape(image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """(rows, columns) of tiles an image of `image_size` (height, width) is cut into."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(tuple(image_size), [list(p) for p in pinpoints])
    return height // tile_size, width // tile_size


def unpadded_box(image_size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """The part of a [height, width] feature map that shows an image of `image_size` (height,
    width), which was resized into it with its aspect ratio kept and padded evenly on both sides
    -> (first row, rows, first column, columns)."""
    image_height, image_width = image_size
    if image_width / image_height > width / height:  # wider than the map: padded above and below
        shown = int(round(image_height * (width / image_width), 7))
        pad = (height - shown) // 2
        return pad, height - 2 * pad, 0, width
    shown = int(round(image_width * (height / image_height), 7))
    pad = (width - shown) // 2
    return 0, height, pad, width - 2 * pad


def num_image_tokens(
    image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile_size: int, patch_size: int
) -> int:
    """The tokens an image of `image_size` (height, width) takes: the base tile's features, the
    unpadded map's and one newline per row of it."""
    side = tile_size // patch_size  # features per tile side
    rows, cols = grid_shape(image_size, pinpoints, tile_size)
    _, height, _, width = unpadded_box(image_size, rows * side, cols * side)
    return side * side + height * (width + 1)
