"""Settings: the engine's declared once (EngineConfig's fields), flags over LIGHTGATE_* environment
over a config file over the defaults; the shipped examples list every setting at its default."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from engine import EngineConfig
from openai_compat.config import ENGINE_SETTINGS, InvalidSettingsError, Settings, add_cli_flags, load_settings
from tests.openai_compat.servers import REPO, ProcessServer

EXAMPLE_CONFIG = REPO / "deploy" / "lightgate.example.yaml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LIGHTGATE_* variable and no .env of the machine running the tests."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"LIGHTGATE_{name.upper()}", raising=False)
    monkeypatch.chdir(tmp_path)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    return parser.parse_args(list(argv))


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTGATE_PORT", "9001")
    monkeypatch.setenv("LIGHTGATE_API_KEYS", "a, b")
    monkeypatch.setenv("LIGHTGATE_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("LIGHTGATE_MODEL", "")  # empty: the default
    settings = load_settings(parse("--port", "9002", "--no-enable-prefix-caching", "--model-aliases", "x,y"))
    assert settings.port == 9002 and settings.api_keys == ["a", "b"] and settings.model_aliases == ["x", "y"]
    config = settings.engine
    assert config.max_num_seqs == 8 and config.enable_prefix_caching is False and config.model is None


def test_defaults() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.host, settings.port, settings.cors_allow_origins) == ("127.0.0.1", 8000, ["*"])
    assert settings.engine == EngineConfig()
    assert Settings(_env_file=None, cors_allow_origins="none").cors_allow_origins == []  # type: ignore[call-arg]


def test_engine_settings_are_engine_config_fields() -> None:
    """Every EngineConfig field declared with its help text is a setting of that name, type,
    default and help, and a flag; the one without help is a test aid, not a setting."""
    fields = {field.name: field for field in dataclasses.fields(EngineConfig)}
    assert {name for name, field in fields.items() if "help" not in field.metadata} == {"check_launch_syncs"}
    assert set(ENGINE_SETTINGS) == {name for name, field in fields.items() if "help" in field.metadata}
    flags = parse()
    for name in ENGINE_SETTINGS:
        setting = Settings.model_fields[name]
        assert setting.description == fields[name].metadata["help"] and setting.default == fields[name].default
        assert hasattr(flags, name), name
    assert load_settings(parse("--cache-dir", "/models/cache", "--kv-cache-dtype", "int8")).engine == EngineConfig(
        cache_dir="/models/cache", kv_cache_dtype="int8"
    )


def test_invalid_values_are_refused_naming_the_setting() -> None:
    with pytest.raises(InvalidSettingsError, match="port"):
        load_settings(parse("--port", "http"))
    with pytest.raises(SystemExit):
        parse("--admission", "greedy")
    # EngineConfig's own checks, reported as settings errors.
    with pytest.raises(InvalidSettingsError, match="max_num_seqs must be at least 1"):
        load_settings(parse("--max-num-seqs", "0"))
    with pytest.raises(InvalidSettingsError, match="gpu_memory_utilization"):
        load_settings(parse("--gpu-memory-utilization", "1.5"))


def test_flags_over_environment_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "lightgate.yaml", (
        "port: 9100\nmax_num_seqs: 16\nadmission: aggressive\nkv_cache_dtype: int8\n"
        "api_keys: [k1, k2]\nenable_prefix_caching: false\n"
    ))
    monkeypatch.setenv("LIGHTGATE_PORT", "9200")
    monkeypatch.setenv("LIGHTGATE_MAX_NUM_SEQS", "32")
    settings = load_settings(parse("--config", config, "--port", "9300"))
    assert settings.port == 9300  # the flag beats the environment and the file
    assert settings.engine.max_num_seqs == 32  # the environment beats the file
    assert settings.api_keys == ["k1", "k2"] and settings.engine.admission == "aggressive"
    assert settings.engine.kv_cache_dtype == "int8" and settings.engine.enable_prefix_caching is False
    assert settings.host == "127.0.0.1"  # in none of them: the default


def test_a_dotenv_file_beats_the_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "lightgate.yaml", "max_num_seqs: 16\ntensor_parallel_size: 2\n")
    write(tmp_path / ".env", "LIGHTGATE_MAX_NUM_SEQS=4\n")  # the working directory's .env
    settings = load_settings(parse("--config", config))
    assert settings.engine.max_num_seqs == 4 and settings.engine.tensor_parallel_size == 2


def test_a_toml_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "lightgate.toml", 'model_aliases = ["a", "b"]\nmax_num_batched_tokens = 1024\n')
    settings = load_settings(parse("--config", config))
    assert settings.model_aliases == ["a", "b"] and settings.engine.max_num_batched_tokens == 1024


@pytest.mark.parametrize(("name", "text", "message"), [
    ("lightgate.yaml", "max_num_seq: 8\n", r"unknown setting 'max_num_seq' \(did you mean 'max_num_seqs'\?\)"),
    ("lightgate.toml", "[engine]\nmax_num_seqs = 8\n", "unknown setting 'engine'"),
    ("lightgate.yaml", "port: 80\nconfig: other.yaml\n", "unknown setting 'config'"),
    ("lightgate.yaml", "max_num_seqs: many\n", r"max_num_seqs: Input should be a valid integer.*'many'"),
    ("lightgate.yaml", "admission: greedy\n", "admission: Input should be 'conservative' or 'aggressive'"),
    ("lightgate.yaml", "kv_cache_dtype: int4\n", "kv_cache_dtype must be auto, int8"),
    ("lightgate.yaml", "- port\n- 80\n", "must map setting names to values"),
    ("lightgate.yaml", "port: [80\n", "not valid YAML"),
    ("lightgate.toml", "port = \n", "not valid TOML"),
    ("lightgate.json", "{}", "YAML .* or TOML"),
])
def test_config_file_errors_name_the_problem(tmp_path: Path, name: str, text: str, message: str) -> None:
    config = write(tmp_path / name, text)
    with pytest.raises(InvalidSettingsError, match=message):
        load_settings(parse("--config", config))


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettingsError, match="no such config file"):
        load_settings(parse("--config", str(tmp_path / "nowhere.yaml")))


@pytest.mark.parametrize(("text", "message"), [
    ("max_num_seqs: 8\nmax_num_seq: 8\n", "unknown setting 'max_num_seq'"),
    ("port: http\n", "port: Input should be a valid integer"),
])
def test_serve_with_a_bad_config_file_exits_2_with_a_message(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "lightgate.yaml", text)
    done = subprocess.run(
        [sys.executable, "-m", "openai_compat", "--config", config], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("lightgate serve: error: "), done.stderr


def test_env_example_lists_every_setting_at_its_default() -> None:
    path = REPO / ".env.example"
    lines = path.read_text().splitlines()
    assigned = [line.split("=", 1)[0] for line in lines if line.startswith("LIGHTGATE_")]
    assert sorted(assigned) == sorted(f"LIGHTGATE_{name.upper()}" for name in Settings.model_fields)
    from_file = Settings(_env_file=path)  # type: ignore[call-arg]
    assert from_file.model_dump() == Settings(_env_file=None).model_dump()  # type: ignore[call-arg]


def test_example_config_lists_every_setting_at_its_default() -> None:
    keys = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert sorted(keys) == sorted(Settings.model_fields)
    from_file = load_settings(parse("--config", str(EXAMPLE_CONFIG)))
    assert from_file.model_dump() == Settings(_env_file=None).model_dump()  # type: ignore[call-arg]


def test_a_server_configured_by_file_environment_and_flags(tmp_path: Path) -> None:
    """A GGUF model served through a config file, as a user runs it: the file's cache directory is
    where the engine converts the model, and the environment and flags win over the file."""
    from tests.engine.models.harness import save_tiny_model, tiny_config
    from tests.engine.models.test_gguf import QT, write_gguf

    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("llama", max_position_embeddings=512))
    write_gguf(tmp_path / "tiny.gguf", hf, QT.F32)
    config = write(tmp_path / "lightgate.yaml", yaml.safe_dump({
        "model": str(tmp_path / "tiny.gguf"), "cache_dir": str(tmp_path / "cache"), "served_model_name": "from-file",
        "max_model_len": 256, "kv_cache_memory_gb": 0.01, "kv_cache_dtype": "int8", "max_num_seqs": 4,
    }))
    server = ProcessServer(
        "--config", config, "--max-model-len", "128", log_dir=tmp_path,
        env={"LIGHTGATE_SERVED_MODEL_NAME": "from-env"},
    )
    try:
        server.wait_healthy()
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        assert (card["id"], card["max_model_len"]) == ("from-env", 128)
        completion = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "from-env", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True,
        })
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 4
    finally:
        assert server.stop() == 0
    converted = list((tmp_path / "cache").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
