"""A vision-language model's images in the worker: embedded once per row, placed per step.

A row's `NewRow.images` (`PromptImage`: pixels and the placeholder positions they fill) are kept
here until the row is freed. When a step's tokens of a row cover some of an image's placeholder
positions, the image is embedded (`model.embed_images`: vision tower and projector; all the
step's new images in one batch per pixel shape, for any-resolution images per tile count), and
the rows of the embedding that those positions take go to the model's forward pass with their
indices in the packed batch. A prefill
chunk may end inside an image: the image is embedded at its first chunk and the later chunks
slice the same embedding; it is dropped once its last position is computed (a preempted row
comes back with a new `NewRow`). The newest embeddings are also kept by their image's content
key, up to the router's image tokens a step (`max_image_tokens_per_step`): a row that needs the
same image (a sibling of an `n > 1` request, a prompt whose cached prefix ends inside it, a
preempted row back) takes it from there instead of running the tower again. Steps with images
run eagerly, never through a CUDA graph (the graphs take token ids only).

An M-RoPE model (Qwen2-VL: `model.mrope`) takes its images as patches with their grids, all of a
step's new images in one call, and its rotary positions from `rope_positions`: each row with
images keeps its `RowRope` (engine/worker/mrope_positions.py) until it is freed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.messages import SeqStep
from engine.multimodal import PromptImage
from engine.worker.mrope_positions import RowRope
from engine.worker.transfer import to_device


@dataclass(slots=True)
class _RowImage:
    image: PromptImage
    embeds: torch.Tensor | None = None  # [num_tokens, hidden_size] once embedded


class ImageInputs:
    def __init__(self, model: Any, device: str | torch.device, max_recent_tokens: int = 0) -> None:
        self.model = model
        self.device = device
        # The newest embeddings by their image's content key (least recently used first), up to
        # `max_recent_tokens` tokens: another row with the same image takes it from here (the
        # choices of an `n > 1` request, a prompt cached up to inside the image, a preempted row).
        self.recent: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.max_recent_tokens = max_recent_tokens
        self.num_recent_tokens = 0
        self.rows: dict[int, list[_RowImage]] = {}  # row -> its prompt's images, in order
        # M-RoPE: row -> its positions' offsets (rows with images only)
        self.merge_size: int | None = model.spatial_merge_size if getattr(model, "mrope", False) else None
        self.rope: dict[int, RowRope] = {}

    def set_row(self, row: int, images: Sequence[PromptImage]) -> None:
        if images:
            self.rows[row] = [_RowImage(image) for image in images]
            if self.merge_size is not None:
                self.rope[row] = RowRope.of(images, self.merge_size)
        else:
            self.free_row(row)

    def free_row(self, row: int) -> None:
        self.rows.pop(row, None)
        self.rope.pop(row, None)

    def rope_positions(self, seqs: Sequence[SeqStep]) -> np.ndarray | None:
        """An M-RoPE model's positions of a packed step in which a row has images: [3, T] when
        the step has image tokens, else [T] (every token's three are equal: its index shifted by
        the images before it); None when no row of the step has images (the token indices)."""
        if not self.rope or not any(s.row in self.rope for s in seqs):
            return None
        if self.in_step(seqs):
            return np.concatenate([self._three(s) for s in seqs], axis=1)
        firsts = [s.start_pos + (rope.shift_at(s.start_pos) if (rope := self.rope.get(s.row)) else 0) for s in seqs]
        if all(len(s.token_ids) == 1 for s in seqs):  # decodes: no array per sequence
            return np.array(firsts, dtype=np.int64)
        return np.concatenate([np.arange(a, a + len(s.token_ids)) for a, s in zip(firsts, seqs, strict=True)])

    def _three(self, s: SeqStep) -> np.ndarray:
        rope, n = self.rope.get(s.row), len(s.token_ids)
        return rope.positions(s.start_pos, n) if rope else np.broadcast_to(np.arange(s.start_pos, s.start_pos + n), (3, n))

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
        """Embed the images of `entries`: each distinct image once, unless a recent embedding has it."""
        todo: dict[object, _RowImage] = {}  # content key (or the entry itself) -> the entry that embeds it
        for entry in entries:
            key = entry.image.cache_key
            if key is not None and (recent := self.recent.get(key)) is not None:
                self.recent.move_to_end(key)
                entry.embeds = recent
            else:
                todo.setdefault(entry if key is None else key, entry)
        made = list(todo.values())
        for entry, embeds in zip(made, self.embed([e.image for e in made]), strict=True):
            entry.embeds = self._remember(entry.image.cache_key, embeds)
        for entry in entries:
            if entry.embeds is None:  # the same image as another entry's, embedded just now
                entry.embeds = todo[entry.image.cache_key].embeds

    def _remember(self, key: int | None, embeds: torch.Tensor) -> torch.Tensor:
        """Keep `embeds` among the recent ones (a copy of its own when it is part of a batch's
        tensor: a slice would hold all of it), the oldest dropped past the bound."""
        num_tokens = embeds.shape[0]
        if key is None or num_tokens > self.max_recent_tokens:
            return embeds
        if embeds.untyped_storage().nbytes() > embeds.numel() * embeds.element_size():
            embeds = embeds.clone()
        self.recent[key] = embeds
        self.num_recent_tokens += num_tokens
        while self.num_recent_tokens > self.max_recent_tokens:
            self.num_recent_tokens -= self.recent.popitem(last=False)[1].shape[0]
        return embeds

    def embed(self, images: Sequence[PromptImage]) -> list[torch.Tensor]:
        """Each image's embedding [num_tokens, hidden_size]: one tower batch per pixel shape, or
        (patches with their grids) every image packed in one batch."""
        if not images:
            return []
        if self.merge_size is not None:
            patches = np.concatenate([image.pixel_values for image in images])
            packed = self.model.embed_images(  # [sum of tokens, hidden_size]
                to_device(torch.from_numpy(patches), torch.float32, self.device), [image.grid_thw for image in images]
            )
            sizes = [image.num_tokens for image in images]
            _check_tokens(packed.shape[0], sum(sizes))
            return list(packed.split(sizes))
        by_shape: dict[tuple[int, ...], list[int]] = {}  # pixel shape -> indices of its images
        for i, image in enumerate(images):
            by_shape.setdefault(image.pixel_values.shape, []).append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for group in by_shape.values():
            stacked = np.stack([images[i].pixel_values for i in group])
            pixels = to_device(torch.from_numpy(stacked), torch.float32, self.device)
            # one [tokens, hidden_size] per image (any-resolution models unpad by the image's size)
            embeds = self.model.embed_images(pixels, [images[i].image_size for i in group])
            for i, rows in zip(group, embeds, strict=True):
                _check_tokens(rows.shape[0], images[i].num_tokens)
                out[i] = rows
        return out


def _check_tokens(embedded: int, placeholders: int) -> None:
    if embedded != placeholders:
        raise ValueError(f"images embed as {embedded} tokens where the prompt holds {placeholders}")
