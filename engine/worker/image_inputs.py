"""A vision-language model's images in the worker: embedded once per row, placed per step.

A row's `NewRow.images` (`PromptImage`: pixels and the placeholder positions they fill) are kept
here until the row is freed. When a step's tokens of a row cover some of an image's placeholder
positions, the image is embedded (`model.embed_images`: vision tower and projector; all the
step's new images in one batch per pixel shape, for any-resolution images per tile count), and
the rows of the embedding that those positions take go to the model's forward pass with their
indices in the packed batch. A prefill
chunk may end inside an image: the image is embedded at its first chunk and the later chunks
slice the same embedding; it is dropped once its last position is computed (a preempted row
comes back with a new `NewRow` and embeds it again). Steps with images run eagerly, never
through a CUDA graph (the graphs take token ids only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.messages import SeqStep
from engine.multimodal import PromptImage
from engine.worker.transfer import to_device


@dataclass(slots=True)
class _RowImage:
    image: PromptImage
    embeds: torch.Tensor | None = None  # [num_tokens, hidden_size] once embedded


class ImageInputs:
    def __init__(self, model: Any, device: str | torch.device) -> None:
        self.model = model
        self.device = device
        self.rows: dict[int, list[_RowImage]] = {}  # row -> its prompt's images, in order

    def set_row(self, row: int, images: Sequence[PromptImage]) -> None:
        if images:
            self.rows[row] = [_RowImage(image) for image in images]
        else:
            self.rows.pop(row, None)

    def free_row(self, row: int) -> None:
        self.rows.pop(row, None)

    def in_step(self, seqs: Sequence[SeqStep]) -> bool:
        """Whether any of the step's tokens is an image's placeholder."""
        return bool(self.rows) and any(self._overlaps(s) for s in seqs)

    def _overlaps(self, s: SeqStep) -> list[tuple[_RowImage, int, int]]:
        """(image, first, end) of each image position range [first, end) the step computes for `s`,
        relative to the image's first placeholder."""
        out = []
        lo, hi = s.start_pos, s.start_pos + len(s.token_ids)
        for entry in self.rows.get(s.row, ()):
            offset = entry.image.offset
            first, end = max(lo, offset), min(hi, offset + entry.image.num_tokens)
            if first < end:
                out.append((entry, first - offset, end - offset))
        return out

    def step_embeds(self, seqs: Sequence[SeqStep]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The image embedding rows of a packed step -> (their indices in the packed batch [K],
        the rows [K, hidden_size]); None when the step has no image position."""
        if not self.rows:
            return None
        placed: list[tuple[int, _RowImage, int, int]] = []  # (packed index of the first, image, first, end)
        base = 0
        for s in seqs:
            for entry, first, end in self._overlaps(s):
                placed.append((base + entry.image.offset + first - s.start_pos, entry, first, end))
            base += len(s.token_ids)
        if not placed:
            return None
        self._embed([entry for _, entry, _, _ in placed if entry.embeds is None])
        index = [i for at, _, first, end in placed for i in range(at, at + end - first)]
        rows = []
        for _, entry, first, end in placed:
            assert entry.embeds is not None
            rows.append(entry.embeds[first:end])
            if end == entry.image.num_tokens:  # its last position: not needed again in this row
                entry.embeds = None
        return to_device(index, torch.long, self.device), torch.cat(rows)

    def _embed(self, entries: list[_RowImage]) -> None:
        """Embed the images of `entries`, one batch per pixel shape."""
        by_shape: dict[tuple[int, ...], list[_RowImage]] = {}
        for entry in entries:
            by_shape.setdefault(entry.image.pixel_values.shape, []).append(entry)
        for group in by_shape.values():
            pixels = to_device(torch.from_numpy(np.stack([e.image.pixel_values for e in group])), torch.float32, self.device)
            # one [tokens, hidden_size] per image (any-resolution models unpad by the image's size)
            embeds = self.model.embed_images(pixels, [e.image.image_size for e in group])
            for entry, rows in zip(group, embeds, strict=True):
                if rows.shape[0] != entry.image.num_tokens:
                    raise ValueError(
                        f"an image embeds as {rows.shape[0]} tokens where the prompt holds {entry.image.num_tokens}"
                    )
                entry.embeds = rows
