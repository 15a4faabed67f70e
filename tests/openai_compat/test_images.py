"""`image_url` parts read and decoded (openai_compat/images.py), without a server."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest

from openai_compat.errors import OpenAIError
from openai_compat.images import ChatImages, ImagePart, decode_image, read_image_part
from openai_compat.protocol import ChatCompletionRequest, ContentPart
from openai_compat.serving_chat import template_messages

PARAM = "messages[0].content[1]"


def _png(width: int, height: int, color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _part(url: Any) -> ContentPart:
    return ContentPart(type="image_url", image_url={"url": url} if url is not None else {})


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_a_data_url_is_read_and_decoded_as_rgb() -> None:
    part = read_image_part(_part(_url(_png(7, 5))), PARAM)
    image = decode_image(part, max_pixels=35)
    assert image.mode == "RGB" and image.size == (7, 5) and image.getpixel((0, 0)) == (10, 20, 30)


def test_more_pixels_than_the_limit_is_a_400_before_decoding() -> None:
    part = ImagePart(PARAM, _png(7, 5))
    with pytest.raises(OpenAIError) as info:
        decode_image(part, max_pixels=34)
    assert info.value.param == PARAM and "7x5" in info.value.message


def test_a_gif_gives_its_first_frame() -> None:
    from PIL import Image

    frames = [Image.new("RGB", (4, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_image(ImagePart(PARAM, buffer.getvalue()), max_pixels=100)
    assert image.getpixel((1, 1)) == (255, 0, 0)


@pytest.mark.parametrize("url,param,code", [
    ("http://example.com/a.png", PARAM, "unsupported_parameter"),
    ("file:///etc/passwd", PARAM, None),
    (None, PARAM + ".image_url.url", None),
])
def test_urls_that_are_not_base64_data_are_refused(url: Any, param: str, code: str | None) -> None:
    with pytest.raises(OpenAIError) as info:
        read_image_part(_part(url), PARAM)
    assert info.value.param == param and info.value.code == code


def test_images_stand_as_the_placeholder_in_the_message_text() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": _url(_png(2, 2))}},
                                     {"type": "text", "text": "b"}]},
    ]})
    images = ChatImages("<image>", max_images=1)
    assert template_messages(req.messages, images)[0]["content"] == "a\n<image>\nb"
    assert [p.param for p in images.parts] == [PARAM]
    with pytest.raises(OpenAIError) as info:  # one more than the limit
        template_messages(req.messages, images)
    assert info.value.param == PARAM and "At most 1" in info.value.message
    with pytest.raises(OpenAIError) as info:  # a model of text only
        template_messages(req.messages, ChatImages(None, max_images=8))
    assert info.value.param == PARAM and "does not take images" in info.value.message


# A template in the style of vision-language models': images placed from content parts.
PARTS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA with the default model's tokenizer + `<image>`."""
    from tests.openai_compat.servers import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("llava-template"))


@pytest.fixture(scope="module")
def llava(llava_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, image processor) of `llava_dir`."""
    from transformers import AutoTokenizer

    from engine.models.loader import load_hf_config
    from engine.multimodal import image_processor_for

    path = llava_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, image_processor_for(str(path), load_hf_config(str(path)), tokenizer)


@pytest.mark.parametrize("template,expected", [
    (PARTS_TEMPLATE, "USER: What is this? <image>\nASSISTANT:"),  # placed from content parts
    (None, "What is this?\n<image>"),  # a template for text content: the placeholder inline
])
def test_chat_templates_place_the_images(llava: tuple[Any, Any], template: str | None, expected: str) -> None:
    from PIL import Image

    from openai_compat.images import render_with_images
    from openai_compat.serving_chat import render_chat

    tokenizer, processor = llava
    images = [processor.preprocess(Image.new("RGB", (40, 50), (1, 2, 3)))]
    messages = [{"role": "user", "content": "What is this?\n<image>"}]
    kwargs = {"chat_template": template} if template else None
    text, ids = render_with_images(render_chat, processor, images, tokenizer, messages, True, kwargs)
    assert expected in text
    assert ids.count(processor.image_token_id) == images[0].num_tokens == 25
    with pytest.raises(OpenAIError) as info:  # a placeholder in the user's own text: one too many
        render_with_images(render_chat, processor, images, tokenizer, [{**messages[0], "content": "<image> <image>"}],
                           True, kwargs)
    assert info.value.param == "messages"


def test_offline_generate_reads_a_text_prompt_with_images_as_a_chat_is_read(
    llava_dir: Path, llava: tuple[Any, Any]
) -> None:
    """`LLM.generate` with the chat's rendered text and its image: the chat path's token ids (each
    placeholder widened to the image's tokens) and answer; a placeholder too many is a ValueError
    naming the prompt."""
    from PIL import Image

    from engine import LLM, SamplingParams
    from openai_compat.images import render_with_images
    from openai_compat.serving_chat import render_chat

    tokenizer, processor = llava
    images = [processor.preprocess(Image.new("RGB", (40, 50), (1, 2, 3)))]
    messages = [{"role": "user", "content": "What is this?\n<image>"}]
    text, ids = render_with_images(render_chat, processor, images, tokenizer, messages, True,
                                   {"chat_template": PARTS_TEMPLATE})
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with LLM(str(llava_dir), dtype="float32", kv_cache_memory_gb=0.01) as llm:
        from_text, from_ids = llm.generate([text, ids], params, images=[images, images])
        with pytest.raises(ValueError) as info:
            llm.generate(text + "<image>", params, images=[images])
    assert from_text.prompt_token_ids == ids and ids.count(processor.image_token_id) == 25
    assert from_text.prompt == text
    assert from_text.outputs[0].token_ids == from_ids.outputs[0].token_ids
    assert info.value.args[1] == "prompt"


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://example.com/a.png", True),
    ("http://img.example.com/a.png", True),  # a subdomain of an allowed domain
    ("https://EXAMPLE.com./a.png", True),
    ("https://badexample.com/a.png", False),  # not a subdomain, only the same suffix
    ("https://example.com.evil.net/a.png", False),
    ("ftp://example.com/a.png", False),
    ("https://other.org/a.png", False),
])
def test_media_policy_allows_only_its_domains(url: str, allowed: bool) -> None:
    from openai_compat.media_fetch import MediaPolicy

    policy = MediaPolicy(("example.com",))
    assert policy.allows(url) is allowed
    assert not MediaPolicy().allows(url) and MediaPolicy(("*",)).allows(url) is url.startswith("http")
    if allowed:
        part = read_image_part(_part(url), PARAM, policy)
        assert part.url == url and part.data == b""
    else:
        with pytest.raises(OpenAIError) as info:
            read_image_part(_part(url), PARAM, policy)
        assert info.value.param == PARAM
