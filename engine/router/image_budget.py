"""`ImageBudget`: the image tokens a step may embed through the vision tower.

A vision-language model's step embeds every image whose placeholder positions its tokens reach
for the first time in their row (engine/worker/image_inputs.py): the vision tower's work and
activations, and the embeddings held until the row has computed them, grow with those images'
tokens, not with the step's token budget. The router bounds them: a step embeds at most
`max_image_tokens_per_step` image tokens (placeholder positions). A sequence whose chunk reaches
an image past the bound is cut just before that image's first placeholder (the text before it
still runs) and the image waits for a later step; one image larger than the bound runs as the
step's only new image, so none waits for ever. Once an image is held back, every later one of
the step is too: images are embedded in the order the router plans sequences (decodes, running
prefills by arrival, then admissions first come first served).

What counts: for a sequence that (re)enters its row this step, every image its chunk touches
(a row starting inside an image embeds all of it); for a running one, the images whose first
placeholder its chunk reaches (one begun in an earlier step of the row is held by the worker).
The GPU memory profile runs the tower at this bound (engine/worker/kv_pool.py).
"""

from __future__ import annotations

from collections.abc import Iterator

from engine.multimodal import PromptImage
from engine.router.seq import Seq


def images_embedded(seq: Seq, start: int, num_tokens: int, new_row: bool) -> Iterator[PromptImage]:
    """The images of `seq` a step computing its positions [start, start + num_tokens) embeds."""
    end = start + num_tokens
    for image in seq.images:
        first = image.offset
        if first >= end:
            return  # (the images are in prompt order)
        if first + image.num_tokens > start and (new_row or first >= start):
            yield image


class ImageBudget:
    """One step's image tokens: `fit` a chunk before scheduling it, `spend` what was scheduled,
    `reset` at the start of each step."""

    def __init__(self, max_tokens: int | None) -> None:
        self.max_tokens = max_tokens  # None: no bound
        self.used = 0
        self.closed = False  # an image was held back this step: the later ones wait too

    def reset(self) -> None:
        self.used = 0
        self.closed = False

    def fit(self, seq: Seq, start: int, num_tokens: int, new_row: bool) -> int:
        """How many of the `num_tokens` tokens from `start` the step can take: all of them, or those
        before the first image past the bound (0 when the chunk starts inside it)."""
        if not seq.images or self.max_tokens is None:
            return num_tokens
        used = self.used
        for image in images_embedded(seq, start, num_tokens, new_row):
            if self.closed or (used and used + image.num_tokens > self.max_tokens):
                self.closed = True
                return max(image.offset - start, 0)
            used += image.num_tokens
        return num_tokens

    def spend(self, seq: Seq, start: int, num_tokens: int, new_row: bool) -> None:
        """Count the images a scheduled chunk embeds."""
        if seq.images and self.max_tokens is not None:
            self.used += sum(image.num_tokens for image in images_embedded(seq, start, num_tokens, new_row))
