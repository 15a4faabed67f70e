"""Images in chat through the server, with the openai SDK: a tiny LLaVA 1.5 (25 tokens an image)
answering base64 PNGs, streamed and not, and images at http URLs of an allowed host; the prefix
cache over a repeated image; each bad image input a 400 naming its part; a tiny LLaVA-NeXT
(tokens by image size) answering too."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from tests.openai_compat.servers import TINY, TINY_ARGS, ProcessServer, build_tiny_llava, post

TOKENS_PER_IMAGE = 25


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """Prefill chunks of 16 tokens: chunk boundaries fall inside the images."""
    model = build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    server = ProcessServer(
        "--model", str(model), *TINY_ARGS, "--max-num-batched-tokens", "16", "--max-images-per-request", "2",
        "--allowed-media-domains", "127.0.0.1", "--media-fetch-timeout", "2", "--max-image-bytes", "200000",
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


def _encoded(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def _ask(url: str, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, _image_part(url)]}]


def _client(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _num_text_tokens(server: ProcessServer, text: str) -> int:
    """Tokens of the same chat with the placeholder's one token where the image goes."""
    messages = [{"role": "user", "content": text + "\n<image>"}]
    return int(post(server.url, "/tokenize", {"model": TINY, "messages": messages}).json()["count"])


def _answered_and_streamed(server: ProcessServer, url: str, image_tokens: int) -> tuple[str, Any]:
    """A chat with the image at `url` answered, then streamed: the same text, `prompt_tokens`
    counting the image's tokens -> (the text, the arguments asked with)."""
    client = _client(server)
    kwargs: dict[str, Any] = dict(model=TINY, messages=_ask(url), max_tokens=8, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    response = client.chat.completions.create(**kwargs)
    text = response.choices[0].message.content
    assert text and response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 8
    expected = _num_text_tokens(server, "What is in this picture?") - 1 + image_tokens
    assert response.usage.prompt_tokens == expected
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == expected
    return text, kwargs


def test_chat_with_an_image_answered_and_streamed(llava_server: ProcessServer) -> None:
    client = _client(llava_server)
    text, kwargs = _answered_and_streamed(llava_server, _data_url(_encoded(48, 40, seed=1)), TOKENS_PER_IMAGE)
    # another image, the same text: another answer (the image is read)
    other = client.chat.completions.create(**{**kwargs, "messages": _ask(_data_url(_encoded(48, 40, seed=2)))})
    assert other.choices[0].message.content != text


def test_repeated_image_served_from_the_prefix_cache(llava_server: ProcessServer) -> None:
    client = _client(llava_server)
    image, other = _data_url(_encoded(33, 61, seed=3)), _data_url(_encoded(33, 61, seed=4))
    first = _ask(image, "Describe it.")
    kwargs: dict[str, Any] = dict(model=TINY, max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True})
    answer = client.chat.completions.create(messages=first, **kwargs)
    turn = [*first, {"role": "assistant", "content": answer.choices[0].message.content},
            {"role": "user", "content": "And its colours?"}]
    again = client.chat.completions.create(messages=turn, **kwargs)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    image_end = _num_text_tokens(llava_server, "Describe it.") - 1 + TOKENS_PER_IMAGE
    assert again.usage.prompt_tokens_details.cached_tokens >= image_end
    # the same text with another image: nothing past the image's first position is reused
    swapped = client.chat.completions.create(messages=[turn[0] | {"content": _ask(other, "Describe it.")[0]["content"]},
                                                       *turn[1:]], **kwargs)
    assert swapped.usage is not None and swapped.usage.prompt_tokens_details is not None
    assert swapped.usage.prompt_tokens_details.cached_tokens < image_end - TOKENS_PER_IMAGE + 1


def _error(server: ProcessServer, messages: list[dict[str, Any]]) -> dict[str, Any]:
    response = post(server.url, "/v1/chat/completions", {"model": TINY, "messages": messages, "max_tokens": 2})
    assert response.status_code == 400, response.text
    return dict(response.json()["error"])


BAD_IMAGES = {
    "an http URL of a host not allowed": ("https://example.com/cat.png", "not fetched"),
    "larger than --max-image-bytes": (_data_url(b"\0" * 200_100), "larger than"),
    "not base64": ("data:image/png;base64,%%%", "base64"),
    "not an image": (_data_url(b"just some bytes"), "could not be decoded"),
    "a truncated PNG": (_data_url(_encoded(20, 20, seed=5)[:60]), "could not be decoded"),
    "an unsupported format (BMP)": (_data_url(_encoded(20, 20, seed=6, fmt="BMP"), "image/bmp"), "BMP"),
    "a data URL not in base64": ("data:image/png,rawbytes", "base64"),
    "too thin (the resize would blow it up)": (_data_url(_encoded(2, 200, seed=10)), "at most 64 times"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_400_naming_the_part(llava_server: ProcessServer, case: str) -> None:
    url, words = BAD_IMAGES[case]
    error = _error(llava_server, _ask(url))
    assert error["param"] == "messages[0].content[1]" and words in error["message"], error


def test_other_image_formats_are_read(llava_server: ProcessServer) -> None:
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")):
        messages = _ask(_data_url(_encoded(40, 30, seed=7, fmt=fmt), mime))
        response = post(llava_server.url, "/v1/chat/completions", {"model": TINY, "messages": messages, "max_tokens": 2})
        assert response.status_code == 200, (fmt, response.text)


def test_a_multi_picture_jpeg_is_read_as_its_first_picture(llava_server: ProcessServer) -> None:
    """A camera's JPEG with a second picture in it (MPO, as phones save photos): its first."""
    from PIL import Image

    first = Image.open(io.BytesIO(_encoded(40, 30, seed=13)))
    second = Image.open(io.BytesIO(_encoded(40, 30, seed=14)))
    mpo, jpeg = io.BytesIO(), io.BytesIO()
    first.save(mpo, format="MPO", save_all=True, append_images=[second])
    first.save(jpeg, format="JPEG")
    answers = []
    for data in (mpo.getvalue(), jpeg.getvalue()):
        body = {"model": TINY, "messages": _ask(_data_url(data, "image/jpeg")), "max_tokens": 4, "temperature": 0.0}
        response = post(llava_server.url, "/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]


def test_too_many_images_is_a_400_naming_the_first_one_past_the_limit(llava_server: ProcessServer) -> None:
    url = _data_url(_encoded(20, 20, seed=8))
    messages = [
        {"role": "user", "content": [_image_part(url), {"type": "text", "text": "and"}, _image_part(url)]},
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": [{"type": "text", "text": "one more"}, _image_part(url)]},
    ]
    error = _error(llava_server, messages)
    assert error["param"] == "messages[2].content[1]" and "At most 2 images" in error["message"], error


def test_completions_stay_text_only(llava_server: ProcessServer) -> None:
    """A completions prompt that names the image placeholder has no image for it: a 400 naming
    the prompt (the request has no `images` field)."""
    response = post(llava_server.url, "/v1/completions", {"model": TINY, "prompt": "look: <image>", "max_tokens": 2})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_image_to_a_text_only_model_is_a_400(tiny_server: ProcessServer, tiny_model_dir: Path) -> None:
    error = _error(tiny_server, _ask(_data_url(_encoded(20, 20, seed=9))))
    assert error["param"] == "messages[0].content[1]" and "does not take images" in error["message"], error


@pytest.fixture(scope="module")
def llava_next_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    model = build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-next"), next_=True)
    server = ProcessServer("--model", str(model), *TINY_ARGS, "--max-num-batched-tokens", "64",
                           log_dir=tmp_path_factory.mktemp("logs"))
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


# (width, height) -> LLaVA-NeXT's tokens: 25 for the whole image, then the grid of 30 px tiles (5
# features a side) unpadded, one newline a row. 48x40: 2x2 tiles, 8 of the 10 rows shown:
# 25 + 8 * (10 + 1); 96x30: 1x3 tiles, all 5 rows of 15: 25 + 5 * (15 + 1).
NEXT_TOKENS = {(48, 40): 113, (96, 30): 105}


def test_llava_next_chat_with_images_of_different_sizes(llava_next_server: ProcessServer) -> None:
    texts = []
    for (width, height), tokens in NEXT_TOKENS.items():
        url = _data_url(_encoded(width, height, seed=11))
        text, kwargs = _answered_and_streamed(llava_next_server, url, tokens)
        texts.append(text)
        again = _client(llava_next_server).chat.completions.create(**kwargs)  # the same image: from the cache
        assert again.usage is not None and again.usage.prompt_tokens_details is not None
        assert again.usage.prompt_tokens_details.cached_tokens > tokens
    assert texts[0] != texts[1]


class _ImageHost(http.server.BaseHTTPRequestHandler):
    """A web server of images: a PNG, redirects to it (one to a host the server does not allow:
    `localhost` where only 127.0.0.1 is), a missing path, a body past --max-image-bytes, a slow one."""

    png = _encoded(30, 20, seed=21)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        port = self.server.server_address[1]
        routes: dict[str, tuple[int, dict[str, str], bytes]] = {
            "/cat.png": (200, {"Content-Type": "image/png"}, self.png),
            "/redirect": (302, {"Location": "/cat.png"}, b""),
            "/away": (302, {"Location": f"http://localhost:{port}/cat.png"}, b""),
            "/big.png": (200, {"Content-Type": "image/png"}, b"\0" * 300_000),
        }
        if self.path == "/slow.png":
            time.sleep(4)
        status, headers, body = routes.get(self.path, (404, {}, b"no such image"))
        try:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the server gave up on a slow or large body
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    server.daemon_threads = False  # server_close() waits for the handlers (the slow one) and their sockets
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_image_at_an_allowed_url_is_fetched(llava_server: ProcessServer, image_host: str) -> None:
    """The image at an http URL of an allowed host (directly, and through a redirect) gives the
    answer of the same image sent inline."""
    client = _client(llava_server)
    kwargs: dict[str, Any] = dict(model=TINY, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
    inline = client.chat.completions.create(messages=_ask(_data_url(_ImageHost.png)), **kwargs)
    for path in ("/cat.png", "/redirect"):
        fetched = client.chat.completions.create(messages=_ask(image_host + path), **kwargs)
        assert fetched.choices[0].message.content == inline.choices[0].message.content
        assert fetched.usage is not None and inline.usage is not None
        assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens


@pytest.mark.parametrize(("path", "words"), [
    ("/away", "not one of them"),  # redirected to a host not allowed
    ("/missing.png", "HTTP status 404"),
    ("/big.png", "larger than this server's 200000 bytes"),
    ("/slow.png", "within 2 s"),
])
def test_bad_image_url_is_a_400_naming_the_part(llava_server: ProcessServer, image_host: str, path: str,
                                                words: str) -> None:
    error = _error(llava_server, _ask(image_host + path))
    assert error["param"] == "messages[0].content[1]" and words in error["message"], error


def _prompt_tokens(server: ProcessServer, data: bytes, mime: str) -> int:
    response = _client(server).chat.completions.create(model=TINY, messages=_ask(_data_url(data, mime)), max_tokens=1)
    assert response.usage is not None
    return response.usage.prompt_tokens


def test_a_photo_is_read_upright_by_its_exif_orientation(llava_next_server: ProcessServer) -> None:
    """A camera's JPEG stored 96 x 30 with EXIF orientation 6 (turn 90 degrees to view) shows
    30 x 96: the model reads it as shown (LLaVA-NeXT's tokens tell which way it was read)."""
    from PIL import Image

    stored = Image.open(io.BytesIO(_encoded(96, 30, seed=12, fmt="JPEG")))
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    exif[0x010F] = "camera"  # Make
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    upright = _prompt_tokens(llava_next_server, _encoded(30, 96, seed=12), "image/png")
    assert upright != _prompt_tokens(llava_next_server, _encoded(96, 30, seed=12), "image/png")
    assert _prompt_tokens(llava_next_server, buffer.getvalue(), "image/jpeg") == upright
    # the Make tag renamed to a tag whose value must be a number: Pillow's exif_transpose fails on
    # it, the orientation still reads
    broken = buffer.getvalue().replace(b"\x01\x0f\x00\x02", b"\x01\x42\x00\x02", 1)
    assert broken != buffer.getvalue()
    assert _prompt_tokens(llava_next_server, broken, "image/jpeg") == upright


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:99999/cat.png",  # a port out of range
    "http://127.0.0.1:port/cat.png",  # a port that is no number
    "http://[::1/cat.png",  # an IPv6 host not closed
    "http://127.0.0.1/cat\x00.png",  # a control character
])
def test_malformed_image_url_of_an_allowed_host_is_a_400(llava_server: ProcessServer, url: str) -> None:
    error = _error(llava_server, _ask(url))
    assert error["param"] == "messages[0].content[1]", error
