"""M-RoPE positions of a row with images (Qwen2-VL's language model), from its prompt's images.

The router counts tokens: a sequence's token p sits at `start_pos`-relative index p. The model's
rotary positions differ once an image has passed. An image of (t, h, w) merged tokens (h, w: the
patch grid over merge_size) whose first placeholder is at index o starts at rotary position
s = o + shift (shift: what the images before it moved the text by); its token j has the three
positions (s + j // (h w), s + (j // w) mod h, s + j mod w), and the text after it resumes at
s + max(h, w), the image's largest position + 1, not at o + t h w. So a text (or output) token p
after the images sits at p + shift, shift = the sum over those images of max(h, w) - t h w, with
its three positions equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.multimodal import PromptImage


@dataclass(frozen=True, slots=True)
class RowRope:
    """One row's images, as its rotary positions need them."""

    images: tuple[PromptImage, ...]  # in prompt order
    merge_size: int
    end: int  # the index after the last image's last placeholder
    shift: int  # rotary position - token index past `end`

    @classmethod
    def of(cls, images: Sequence[PromptImage], merge_size: int) -> RowRope:
        shift = sum(_span(image, merge_size) - image.num_tokens for image in images)
        last = images[-1]
        return cls(tuple(images), merge_size, last.offset + last.num_tokens, shift)

    def shift_at(self, index: int) -> int:
        """Rotary position - token index of a text token at `index` (not an image's)."""
        if index >= self.end:
            return self.shift
        return sum(_span(i, self.merge_size) - i.num_tokens for i in self.images if i.offset + i.num_tokens <= index)

    def positions(self, start: int, count: int) -> np.ndarray:
        """[3, count] int64: the positions of token indices start .. start + count - 1."""
        if start >= self.end:  # past every image (decodes): one shift
            return np.broadcast_to(np.arange(start + self.shift, start + self.shift + count), (3, count))
        out = np.broadcast_to(np.arange(start, start + count), (3, count)).copy()
        shift = 0
        for image in self.images:
            t, h, w = _merged_grid(image, self.merge_size)
            first, end = image.offset, image.offset + image.num_tokens
            lo, hi = max(start, first), min(start + count, end)
            if lo < hi:  # (written after the earlier images' shifts: absolute values)
                j = np.arange(lo - first, hi - first)
                base = first + shift
                out[0, lo - start : hi - start] = base + j // (h * w)
                out[1, lo - start : hi - start] = base + (j // w) % h
                out[2, lo - start : hi - start] = base + j % w
            moved = _span(image, self.merge_size) - image.num_tokens
            shift += moved
            if end < start + count:
                out[:, max(end, start) - start :] += moved
        return out


def _merged_grid(image: PromptImage, merge_size: int) -> tuple[int, int, int]:
    assert image.grid_thw is not None, "an M-RoPE model's images carry their patch grid"
    t, h, w = image.grid_thw
    return t, h // merge_size, w // merge_size


def _span(image: PromptImage, merge_size: int) -> int:
    """How far the image moves the rotary position: its largest position + 1 - its first."""
    _, h, w = _merged_grid(image, merge_size)
    return max(h, w)
