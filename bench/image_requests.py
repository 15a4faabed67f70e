"""Chat requests with one image each, for the vision-language workloads of `bench serve`.

Each request is a user message of an `image_url` part (a JPEG `data:` URL of `image_size`, its
own picture: smooth colour fields, the size a photo of that resolution compresses to, not the
megabytes of pixel noise) and a text part of random words, sent to `/v1/chat/completions`.
The picture of request i depends only on the seed and i, so two runs send the same bytes; no
two requests share an image (the prefix cache has nothing to reuse across them).
"""

from __future__ import annotations

import base64
import io
import random
from typing import Any

_WORDS = (
    "what", "is", "in", "this", "picture", "describe", "the", "colours", "shapes", "and", "where", "light",
    "comes", "from", "please", "say", "how", "many", "objects", "you", "see", "left", "right", "top", "bottom",
)
_COARSE = 16  # the random field is drawn at 1/16 of the size, then resized up smoothly


def image_data_url(width: int, height: int, seed: int) -> str:
    """A deterministic `width` x `height` JPEG picture as a base64 `data:` URL."""
    from PIL import Image

    rng = random.Random(seed)
    small = (max(1, width // _COARSE), max(1, height // _COARSE))
    field = Image.frombytes("RGB", small, rng.randbytes(small[0] * small[1] * 3))
    picture = field.resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_chat(rng: random.Random, num_words: int, image_size: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    """The messages of one request: an image of `image_size` (width, height), then `num_words` words."""
    text = " ".join(rng.choice(_WORDS) for _ in range(num_words))
    url = image_data_url(*image_size, seed=seed)
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text},
    ]}]
