"""A base model without a chat template: completions served, chat refused with a clear 400 until
the server is given a template with --chat-template (a file, or the template itself)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from openai_compat.config import Settings
from tests.openai_compat.servers import TINY_ARGS, ProcessServer, post

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def _base_model(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with its chat template removed, as a base checkpoint ships."""
    shutil.copytree(tiny_model_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def base_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _base_model(tiny_model_dir, tmp_path_factory.mktemp("base") / "model")


def test_a_model_without_a_chat_template_serves_completions_and_refuses_chat(
    base_model: Path, tmp_path: Path
) -> None:
    server = ProcessServer("--model", str(base_model), *TINY_ARGS, log_dir=tmp_path).wait_healthy()
    try:
        completion = post(server.url, "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 3})
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 3
        for path, body in (("/v1/chat/completions", CHAT), ("/tokenize", {"messages": CHAT["messages"]})):
            refused = post(server.url, path, body)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == "messages" and "--chat-template" in error["message"]
    finally:
        server.stop()


def test_chat_template_option_serves_chat(base_model: Path, tmp_path: Path) -> None:
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(TEMPLATE)
    server = ProcessServer("--model", str(base_model), *TINY_ARGS, "--chat-template", str(template_file),
                           log_dir=tmp_path).wait_healthy()
    try:
        rendered = post(server.url, "/tokenize", {"messages": CHAT["messages"]}).json()["tokens"]
        expected = post(server.url, "/tokenize", {"prompt": "<user>hello\n<assistant>"}).json()["tokens"]
        assert rendered == expected
        answer = post(server.url, "/v1/chat/completions", CHAT)
        assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == len(expected)
    finally:
        server.stop()


def test_chat_template_setting_is_a_file_or_a_template(tmp_path: Path) -> None:
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(TEMPLATE)
    assert Settings(_env_file=None, chat_template=str(template_file)).chat_template == TEMPLATE  # type: ignore[call-arg]
    assert Settings(_env_file=None, chat_template=TEMPLATE).chat_template == TEMPLATE  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        Settings(_env_file=None, chat_template=str(tmp_path / "missing.jinja"))  # type: ignore[call-arg]
