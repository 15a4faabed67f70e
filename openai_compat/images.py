"""Images in chat messages: `image_url` content parts, read and decoded for the model.

A part `{"type": "image_url", "image_url": {"url": "data:image/png;base64,...", "detail": ...}}`
is read in two stages. `ImagePart.of` checks it while the messages are turned into the chat
template's input (cheap, on the event loop): a `data:` URL with base64 data, or an `http(s)` URL
when the server fetches images from its host (`--allowed-media-domains`, off by default; see
`openai_compat/media_fetch.py`), fetched by `fetch_parts` before decoding; either at most
`--max-image-bytes`. `decode_image` then decodes it with Pillow, off the event loop:
PNG, JPEG, WebP or GIF (its first frame), no more pixels than `max_pixels` (checked from the
header, before the pixels are decoded), as RGB, turned upright by its EXIF orientation. Each
problem is a 400 naming the part, `messages[i].content[j]`. `detail` is accepted and has no
effect: the model's image processor decides the resolution.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from openai_compat.errors import OpenAIError
from openai_compat.media_fetch import MediaPolicy, fetch_image, valid_url

# Pillow's format names of the image types served; anything else is refused by name. (MPO: a
# JPEG with more pictures after the first, as cameras and phones save photos; its first is read.)
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF")


@dataclass(frozen=True, slots=True)
class ImagePart:
    """One image of a conversation, found at `param` (`messages[i].content[j]`)."""

    param: str
    data: bytes  # the encoded image, as sent (empty until fetched, for a URL)
    url: str | None = None  # an http(s) URL to fetch the image from


def image_url_of(part: Any, param: str) -> str:
    """The URL of an `image_url` content part (a dict `{"url": ...}`, or the URL itself)."""
    value = getattr(part, "image_url", None)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise OpenAIError("An 'image_url' content part needs 'image_url.url'.", param=f"{param}.image_url.url")
    return url


def read_image_part(part: Any, param: str, policy: MediaPolicy | None = None) -> ImagePart:
    """The bytes of an `image_url` part's `data:` URL, or its http(s) URL when `policy` fetches
    from that host; a 400 naming the part otherwise."""
    policy = policy or MediaPolicy()
    url = image_url_of(part, param)
    if url.startswith(("http://", "https://")):
        if not valid_url(url):
            raise OpenAIError("The image URL is not a valid URL.", param=param)
        if policy.allows(url):
            return ImagePart(param, b"", url)
        raise OpenAIError(
            "Image URLs of this host are not fetched by this server (--allowed-media-domains); send the image "
            "inline as a base64 'data:' URL." if policy.fetches else
            "Image URLs are not fetched by this server; send the image inline as a base64 'data:' URL.",
            param=param, code="unsupported_parameter",
        )
    if not url.startswith("data:"):
        raise OpenAIError("An image URL must be a base64 'data:' URL.", param=param)
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or not header.endswith(";base64"):
        raise OpenAIError("An image 'data:' URL must be base64-encoded ('data:image/png;base64,...').", param=param)
    if len(payload) * 3 // 4 > policy.max_bytes + 2:  # before decoding: base64 is 4 characters per 3 bytes
        raise OpenAIError(f"The image is larger than this server's {policy.max_bytes} bytes (--max-image-bytes).",
                          param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError("The image's base64 data could not be decoded.", param=param) from None
    return ImagePart(param, data)


async def fetch_parts(parts: list[ImagePart], policy: MediaPolicy) -> list[ImagePart]:
    """The parts with each URL's image fetched (concurrently, one client); a 400 naming the first
    part that fails."""
    pending = [part for part in parts if part.url is not None]
    if not pending:
        return parts
    async with httpx.AsyncClient() as client:
        bodies = await asyncio.gather(*(fetch_image(client, p.url or "", policy, p.param) for p in pending))
    fetched = {id(part): body for part, body in zip(pending, bodies, strict=True)}
    return [ImagePart(p.param, fetched[id(p)], p.url) if id(p) in fetched else p for p in parts]


def decode_image(part: ImagePart, max_pixels: int) -> Any:
    """The part's image as an RGB Pillow image (run off the event loop); a 400 naming the part
    for data that is no image, a format not served, or more than `max_pixels` pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(part.data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise OpenAIError("The image could not be decoded.", param=part.param) from None
    if image.format not in FORMATS:
        raise OpenAIError(
            f"Images of format {image.format} are not supported; send PNG, JPEG, WebP or GIF.", param=part.param
        )
    width, height = image.size
    if width * height > max_pixels:
        raise OpenAIError(
            f"The image has {width}x{height} pixels, more than this server's {max_pixels} (--max-image-pixels).",
            param=part.param,
        )
    try:
        image.seek(0)  # a GIF's (or animated WebP's) first frame
        turn = _exif_turn(image)
        rgb = image.convert("RGB")  # decodes the pixels
        return rgb.transpose(turn) if turn is not None else rgb  # a camera's photo as it is shown
    except (OSError, ValueError, Image.DecompressionBombError):
        raise OpenAIError("The image could not be decoded.", param=part.param) from None


def _exif_turn(image: Any) -> Any:
    """The transpose that shows `image` as its EXIF orientation says; None to keep it as stored
    (also where its EXIF data does not parse: ImageOps.exif_transpose raises then)."""
    from PIL import Image

    try:
        orientation = int(image.getexif().get(0x0112, 1))
    except Exception:  # (Pillow raises SyntaxError, struct.error, TypeError, ... on broken EXIF data)
        return None
    t = Image.Transpose
    return {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
            7: t.TRANSVERSE, 8: t.ROTATE_90}.get(orientation)


@dataclass(slots=True)
class ChatImages:
    """The images of one chat request, collected while its messages are read."""

    placeholder: str | None  # the model's image placeholder text; None: the model reads text only
    max_images: int
    policy: MediaPolicy = field(default_factory=MediaPolicy)
    parts: list[ImagePart] = field(default_factory=list)

    def add(self, part: Any, param: str) -> str:
        """Read an `image_url` part -> the text that stands for it in the prompt."""
        if self.placeholder is None:
            raise OpenAIError("This model does not take images.", param=param, code="unsupported_parameter")
        if len(self.parts) >= self.max_images:
            raise OpenAIError(
                f"At most {self.max_images} images are accepted per request (--max-images-per-request).", param=param
            )
        self.parts.append(read_image_part(part, param, self.policy))
        return self.placeholder


def prepare_images(parts: list[ImagePart], processor: Any, max_pixels: int) -> list[Any]:
    """Each part decoded and preprocessed for the model (`ImageProcessor.preprocess`), in order;
    run off the event loop. A 400 naming the part that fails."""
    inputs = []
    for part in parts:
        image = decode_image(part, max_pixels)
        try:
            inputs.append(processor.preprocess(image))
        except (ValueError, OSError) as e:
            raise OpenAIError(f"The image could not be preprocessed for the model: {e}", param=part.param) from None
    return inputs


def as_parts(messages: list[dict[str, Any]], placeholder: str) -> list[dict[str, Any]]:
    """Messages whose text holds the placeholder, with their content as transformers'
    multimodal parts (`{"type": "image"}` where each placeholder was, `{"type": "text"}` between)."""
    out = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str) or placeholder not in content:
            out.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for k, text in enumerate(content.split(placeholder)):
            if k:
                parts.append({"type": "image"})
            if text.strip("\n"):
                parts.append({"type": "text", "text": text.strip("\n")})
        out.append({**message, "content": parts})
    return out


def render_with_images(
    render: Callable[..., tuple[str, list[int]]], processor: Any, images: list[Any], tokenizer: Any,
    messages: list[dict[str, Any]], *args: Any, **kwargs: Any,
) -> tuple[str, list[int]]:
    """`render` (the chat template, then the tokenizer; on the tokenizer's thread) for a chat with
    images -> its text and its token ids with each placeholder widened to its image's tokens.

    The templates of vision-language models place images from content parts (`{"type": "image"}`),
    so the messages are rendered that way first; a template that does not place every image (one
    written for plain-text content) renders the text with the placeholders inline instead."""
    placeholder = processor.placeholder
    try:
        text, ids = render(tokenizer, as_parts(messages, placeholder), *args, **kwargs)
    except OpenAIError:  # a template that cannot take content parts
        text, ids = "", []
    if text.count(placeholder) != len(images):
        text, ids = render(tokenizer, messages, *args, **kwargs)
    try:
        return text, processor.expand_placeholders(ids, images)
    except ValueError as e:  # the template dropped or repeated an image, or the text names the placeholder
        raise OpenAIError(str(e.args[0]), param="messages") from None
