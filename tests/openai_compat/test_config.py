"""Settings: LIGHTGATE_* environment, CLI flags on top, mapped onto EngineConfig."""

from __future__ import annotations

import argparse

import pytest

from openai_compat.config import Settings, add_cli_flags, load_settings
from tests.openai_compat.servers import REPO


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    return parser.parse_args(list(argv))


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTGATE_PORT", "9001")
    monkeypatch.setenv("LIGHTGATE_API_KEYS", "a, b")
    monkeypatch.setenv("LIGHTGATE_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("LIGHTGATE_MODEL", "")  # empty: the default
    settings = load_settings(parse("--port", "9002", "--no-enable-prefix-caching", "--model-aliases", "x,y"))
    assert settings.port == 9002 and settings.api_keys == ["a", "b"] and settings.model_aliases == ["x", "y"]
    assert settings.enable_prefix_caching is False and settings.model is None
    config = settings.engine_config()
    assert config.max_num_seqs == 8 and config.enable_prefix_caching is False and config.model is None


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"LIGHTGATE_{name.upper()}", raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.host, settings.port, settings.cors_allow_origins) == ("127.0.0.1", 8000, ["*"])
    assert Settings(_env_file=None, cors_allow_origins="none").cors_allow_origins == []  # type: ignore[call-arg]


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError):
        load_settings(parse("--port", "http"))
    with pytest.raises(SystemExit):
        parse("--admission", "greedy")


def test_env_example_lists_every_setting() -> None:
    text = (REPO / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"\nLIGHTGATE_{name.upper()}=" in text, name
