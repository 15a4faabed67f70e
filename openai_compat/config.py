"""Server settings: flags of `lightgate serve` over `LIGHTGATE_*` environment variables (and
`.env`) over a config file (`--config lightgate.yaml`, YAML or TOML) over the defaults.

This is the one place where the server reads its environment. The HTTP server's own settings
are declared here; the engine's are `EngineConfig`'s fields declared with `engine.setting` (a
default and a help text), each of which becomes a setting of the same name: a flag
(`--max-num-seqs 64`), an environment variable (`LIGHTGATE_MAX_NUM_SEQS`) and a config file key
(`max_num_seqs: 64`), so that no second list of engine options is kept here. `Settings` is
resolved once at start-up and frozen; `settings.engine` is the `EngineConfig` it describes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin, get_type_hints

from pydantic import Field, PrivateAttr, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)
from pydantic_settings import SettingsError as SourceError

from engine import EngineConfig

ENV_PREFIX = "LIGHTGATE_"
CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".toml")

# Comma-separated in the environment and on the command line ("a,b"); JSON lists and the lists
# of a config file also work; "none" is the empty list.
CommaList = Annotated[list[str], NoDecode]


class InvalidSettingsError(ValueError):
    """A setting or the config file is wrong; the message names what and where."""


def engine_settings() -> dict[str, tuple[Any, Any]]:
    """`EngineConfig`'s settings as pydantic fields (type, `Field`): its type, default and help text."""
    hints = get_type_hints(EngineConfig)
    return {
        field.name: (hints[field.name], Field(field.default, description=field.metadata["help"]))
        for field in dataclasses.fields(EngineConfig)
        if "help" in field.metadata
    }


ENGINE_SETTINGS = tuple(engine_settings())


class _ServerSettings(BaseSettings):
    """The HTTP server's settings; `Settings` adds the engine's (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_ignore_empty=True,  # `LIGHTGATE_MODEL=` means "the default", not an empty path
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
    )

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    served_model_name: str | None = Field(
        None, description="the name clients send as `model` (default: the model directory's name)"
    )
    model_aliases: CommaList = Field(default_factory=list, description="more accepted model names, comma-separated")
    api_keys: CommaList = Field(
        default_factory=list, description="accepted bearer tokens, comma-separated; empty: no authentication"
    )
    cors_allow_origins: CommaList = Field(
        default_factory=lambda: ["*"], description="CORS origins, comma-separated; none: CORS off"
    )
    cors_allow_headers: CommaList = Field(
        default_factory=lambda: ["*"], description="request headers allowed cross-origin (* covers Authorization, X-Stainless-*)"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 when the queue is full")
    # vLLM sets no limit. 64 MiB is far beyond any real request: a full 128k-token context is about
    # 1 MB of JSON as token ids ("12345, " a token) and 0.5 to 3 MB as text, so a batch of dozens of
    # such prompts still fits; yet a body is held whole in memory and parsed into Python objects
    # several times its size, so one request cannot take gigabytes.
    max_request_body_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="largest request body in bytes, refused with 413 beyond (0: no limit)"
    )
    max_images_per_request: int = Field(
        8, ge=0, description="images a chat request may carry (image_url parts), refused with 400 beyond"
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest image in pixels (width x height), refused with 400 beyond"
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="largest encoded image in bytes (inline or fetched), refused with 400 beyond"
    )
    allowed_media_domains: CommaList = Field(
        default_factory=list, description="hosts whose http(s) image URLs are fetched, comma-separated (a domain "
        "covers its subdomains; * any host); empty: image URLs are refused, only inline data: URLs are read"
    )
    media_fetch_timeout: float = Field(10.0, gt=0, description="seconds a fetch of an image URL may take in all")
    trust_request_chat_template: bool = Field(
        False, description="accept chat_template_kwargs.chat_template (a request's own Jinja template runs on the server)"
    )
    chat_template: str | None = Field(
        None, description="the chat template to use instead of the model's (a Jinja file, or the template itself); "
        "a model without one serves chat only with it"
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds running requests may take to finish after SIGTERM; then they end with an error"
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="the format of tool calls in the model's text: auto (from the chat template), hermes, "
        "llama3_json or mistral"
    )
    reasoning_parser: Literal["auto", "think", "none"] = Field(
        "auto", description="thinking split off as reasoning_content: auto (from the chat template), think "
        "(<think>...</think>) or none"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    access_log: bool = Field(True, description="log one line per HTTP request")
    dead_worker_exit_delay: float = Field(
        5.0, ge=0, description="after a worker dies: seconds of 503 answers before the server exits with status 1"
    )

    _engine: EngineConfig = PrivateAttr()

    @field_validator(
        "model_aliases", "api_keys", "cors_allow_origins", "cors_allow_headers", "allowed_media_domains", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            if text.lower() == "none":
                return []
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("chat_template")
    @classmethod
    def _read_chat_template(cls, value: str | None) -> str | None:
        # A path is read now, so that a missing file stops the server at start, not at the first chat.
        if value is None or "{{" in value or "{%" in value:
            return value
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise ValueError(f"chat_template: {value!r} is neither a file nor a Jinja template")
        with open(path, encoding="utf-8") as f:
            return f.read()

    @model_validator(mode="after")
    def _build_engine_config(self) -> _ServerSettings:
        # EngineConfig checks its values (a ValueError here is reported as a validation error).
        values = {name: getattr(self, name) for name in ENGINE_SETTINGS if name in type(self).model_fields}
        self._engine = EngineConfig(**values)
        return self

    @property
    def engine(self) -> EngineConfig:
        """The engine's settings, checked."""
        return self._engine


if TYPE_CHECKING:
    # To a type checker the engine's settings are reached through `settings.engine`.
    Settings = _ServerSettings
else:
    Settings = create_model(
        "Settings", __base__=_ServerSettings, __module__=__name__, __doc__=_ServerSettings.__doc__,
        **engine_settings(),
    )


def is_engine_setting(name: str) -> bool:
    return name in ENGINE_SETTINGS


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, grouped; a flag left out keeps the environment's, the config file's
    or the default value. `--config` names the config file."""
    parser.add_argument(
        "--config", default=None, metavar="FILE",
        help="a YAML (.yaml, .yml) or TOML (.toml) file of settings, keys named as the flags with "
        "underscores (max_num_seqs: 64); flags and LIGHTGATE_* variables override it",
    )
    groups = {False: parser.add_argument_group("HTTP server"), True: parser.add_argument_group("engine")}
    for name, field in Settings.model_fields.items():
        group = groups[is_engine_setting(name)]
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env {ENV_PREFIX}{name.upper()}]"
        annotation = field.annotation
        if annotation is bool or set(get_args(annotation)) == {bool, type(None)}:  # bool | None: unset is None
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = list(get_args(annotation)) if get_origin(annotation) is Literal else None
        group.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)


def load_settings(args: argparse.Namespace | None = None) -> Settings:
    """The settings: flags given in `args` over the environment and `.env` over the config file
    (`args.config`) over the defaults. Raises `InvalidSettingsError` naming what is wrong."""
    flags: dict[str, Any] = {}
    config_file = None
    if args is not None:
        flags = {name: value for name, value in vars(args).items() if name in Settings.model_fields and value is not None}
        config_file = getattr(args, "config", None)
    settings_cls = Settings if config_file is None else _with_config_file(Path(config_file))
    try:
        return settings_cls(**flags)
    except ValidationError as e:
        raise InvalidSettingsError(_describe(e)) from None
    except SourceError as e:
        raise InvalidSettingsError(str(e)) from None


def _with_config_file(path: Path) -> type[Settings]:
    """`Settings` reading `path` below the environment (flags stay on top)."""
    source = _config_file_source(path)

    class SettingsWithFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, dotenv_settings, file_secret_settings, source

    return SettingsWithFile


def _config_file_source(path: Path) -> PydanticBaseSettingsSource:
    """pydantic-settings' source for a YAML or TOML file, its keys checked against the settings."""
    if path.suffix.lower() not in CONFIG_FILE_SUFFIXES:
        raise InvalidSettingsError(f"{path}: a config file is YAML (.yaml, .yml) or TOML (.toml)")
    if not path.is_file():
        raise InvalidSettingsError(f"{path}: no such config file")
    source = _file_source(path)
    for key in source():
        if key not in Settings.model_fields:
            close = difflib.get_close_matches(key, list(Settings.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidSettingsError(f"{path}: unknown setting {key!r}{hint}")
    return source


def _file_source(path: Path) -> PydanticBaseSettingsSource:
    import yaml

    if path.suffix.lower() == ".toml":
        try:
            return TomlConfigSettingsSource(Settings, toml_file=path)
        except ValueError as e:  # tomllib.TOMLDecodeError
            raise InvalidSettingsError(f"{path}: not valid TOML: {e}") from None
    try:
        # The source takes a mapping for granted; a list or a scalar would fail obscurely there.
        if not isinstance(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, dict):
            raise InvalidSettingsError(f"{path}: the file must map setting names to values")
        return YamlConfigSettingsSource(Settings, yaml_file=path, yaml_file_encoding="utf-8")
    except yaml.YAMLError as e:
        raise InvalidSettingsError(f"{path}: not valid YAML: {e}") from None


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors(include_url=False):
        name = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if name:
            lines.append(f"{name}: {message} (got {problem['input']!r})")
        else:  # EngineConfig's own checks, which name the setting
            lines.append(message)
    return "invalid settings: " + "; ".join(lines)
