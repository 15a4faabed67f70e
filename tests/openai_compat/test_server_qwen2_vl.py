"""Qwen2-VL through the server, with the openai SDK: a tiny random model (8 x 8 px a token) with the
default model's tokenizer, Qwen2-VL's vision tokens and a chat template that places image parts
as `<|vision_start|><|image_pad|><|vision_end|>`, answering a base64 PNG streamed and not, its
image tokens counted in `usage.prompt_tokens`, a repeated image served from the prefix cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.openai_compat.servers import TINY, TINY_ARGS, ProcessServer, build_tiny_model, post
from tests.openai_compat.test_server_images import _ask, _data_url, _encoded

# A ChatML template that writes each image part as Qwen2-VL's vision tokens.
_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def build_tiny_qwen2_vl(out: Path) -> Path:
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    build_tiny_model(out)  # the tokenizer files (and a text model's weights, replaced below)
    for path in out.glob("*.safetensors*"):
        path.unlink()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens(_VISION_TOKENS, special_tokens=True)
    tokenizer.chat_template = _TEMPLATE
    tokenizer.save_pretrained(out)
    start, image, end, video = tokenizer.convert_tokens_to_ids(_VISION_TOKENS)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                           vision_start_token_id=start, vision_end_token_id=end,
                           architectures=["Qwen2VLForConditionalGeneration"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16,
                             max_pixels=96 * 96).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def qwen_server(qwen_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """Prefill chunks of 16 tokens: chunk boundaries fall inside the images."""
    server = ProcessServer(
        "--model", str(qwen_model), *TINY_ARGS, "--max-num-batched-tokens", "16", log_dir=tmp_path_factory.mktemp("logs"),
    )
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


def _prompt_tokens(model: Path, text: str, num_image_tokens: int) -> int:
    """Tokens of a chat of `text` then one image, as the template renders it, with the image's tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 1
    return len(ids) - 1 + num_image_tokens


def _client(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_with_an_image_answered_and_streamed(qwen_server: ProcessServer, qwen_model: Path) -> None:
    client = _client(qwen_server)
    kwargs: dict[str, Any] = dict(model=TINY, messages=_ask(_data_url(_encoded(48, 40, seed=1))), max_tokens=8,
                                  temperature=0.0, extra_body={"ignore_eos": True})
    response = client.chat.completions.create(**kwargs)
    text = response.choices[0].message.content
    assert text and response.choices[0].finish_reason == "length"
    # 48 x 40 px: a 12 x 10 patch grid, 6 x 5 = 30 image tokens
    expected = _prompt_tokens(qwen_model, "What is in this picture?", 30)
    assert response.usage is not None and response.usage.prompt_tokens == expected
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == expected
    other = client.chat.completions.create(**{**kwargs, "messages": _ask(_data_url(_encoded(48, 40, seed=2)))})
    assert other.choices[0].message.content != text  # another image, the same text: another answer


def test_repeated_image_served_from_the_prefix_cache(qwen_server: ProcessServer, qwen_model: Path) -> None:
    client = _client(qwen_server)
    first = _ask(_data_url(_encoded(40, 64, seed=3)), "Describe it.")  # 5 x 8 = 40 image tokens
    kwargs: dict[str, Any] = dict(model=TINY, max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True})
    answer = client.chat.completions.create(messages=first, **kwargs)
    turn = [*first, {"role": "assistant", "content": answer.choices[0].message.content},
            {"role": "user", "content": "And its colours?"}]
    again = client.chat.completions.create(messages=turn, **kwargs)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens >= _prompt_tokens(qwen_model, "Describe it.", 40) - 3


@pytest.mark.parametrize("template,expected", [
    (None, "<|im_start|>user\nWhat is this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>"),  # from parts
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}",  # a template for text content
     "user: What is this?\n<|vision_start|><|image_pad|><|vision_end|>"),
])
def test_an_image_stands_as_its_vision_tokens(qwen_model: Path, template: str | None, expected: str) -> None:
    """Placed by the model's template from content parts, or inline: between vision start and end."""
    from PIL import Image
    from transformers import AutoTokenizer

    from engine.models.loader import load_hf_config
    from engine.multimodal import image_processor_for
    from openai_compat.images import render_with_images
    from openai_compat.serving_chat import render_chat

    tokenizer = AutoTokenizer.from_pretrained(qwen_model)
    processor = image_processor_for(str(qwen_model), load_hf_config(str(qwen_model)), tokenizer)
    assert processor is not None and processor.placeholder == "<|vision_start|><|image_pad|><|vision_end|>"
    images = [processor.preprocess(Image.new("RGB", (40, 50), (1, 2, 3)))]
    messages = [{"role": "user", "content": "What is this?\n" + processor.placeholder}]
    text, ids = render_with_images(render_chat, processor, images, tokenizer, messages, True,
                                   {"chat_template": template} if template else None)
    assert expected in text
    assert ids.count(processor.image_token_id) == images[0].num_tokens == 30  # 40 x 48 px: 5 x 6 tokens
    start = ids.index(processor.image_token_id) - 1
    assert tokenizer.convert_ids_to_tokens([ids[start], ids[start + 31]]) == ["<|vision_start|>", "<|vision_end|>"]


def test_tokenize_counts_a_chat_with_images_as_the_chat_does(qwen_server: ProcessServer, qwen_model: Path) -> None:
    """/tokenize of a chat with images: the ids the model sees, as many as the chat's prompt_tokens."""
    messages = [*_ask(_data_url(_encoded(48, 40, seed=4))), {"role": "assistant", "content": "A cat."},
                *_ask(_data_url(_encoded(40, 64, seed=5)), "And this one?")]
    chat = _client(qwen_server).chat.completions.create(model=TINY, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    counted = post(qwen_server.url, "/tokenize", {"model": TINY, "messages": messages})
    assert counted.status_code == 200, counted.text
    assert chat.usage is not None and counted.json()["count"] == chat.usage.prompt_tokens
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(qwen_model).convert_tokens_to_ids("<|image_pad|>")
    assert counted.json()["tokens"].count(pad) == 30 + 40  # 6 x 5 and 5 x 8 merged patches


def test_image_token_in_chat_text_without_an_image_is_a_400_naming_messages(qwen_server: ProcessServer) -> None:
    """(not `images`, a field a chat request does not have; /v1/completions': test_server_images.py)"""
    messages = [{"role": "user", "content": "What is <|image_pad|>?"}]
    response = post(qwen_server.url, "/v1/chat/completions", {"model": TINY, "max_tokens": 2, "messages": messages})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages", response.text
