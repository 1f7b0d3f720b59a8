"""Configuration: one frozen object, validated once at start-up.

Sources, all ending in `Config`: a TOML file (`load_file`), a JSON string handed
from the CLI to Gunicorn workers (`from_json`), or keyword values (`build`).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from minilb.errors import ConfigError

Policy = Literal["round_robin", "random"]
Port = Annotated[int, Meta(ge=1, le=65535)]
PositiveFloat = Annotated[float, Meta(gt=0)]

CONFIG_ENV = "MINILB_CONFIG"
CONFIG_JSON_ENV = "MINILB_CONFIG_JSON"


def _check_url(url: str, role: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https":
        raise ValueError(f"{role} URL {url!r} uses https; minilb talks plain http to servers")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{role} URL {url!r} is not http://host:port")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{role} URL {url!r} has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{role} URL {url!r} must not have a path, query or fragment")


class PrefillServer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A prefill server and the port of its KV bootstrap listener (None: its default)."""

    url: str
    bootstrap_port: Port | None = None

    def __post_init__(self) -> None:
        _check_url(self.url, "prefill")


class DecodeServer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str

    def __post_init__(self) -> None:
        _check_url(self.url, "decode")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything minilb needs to serve; every worker receives the same object."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    prefill: tuple[PrefillServer, ...] = ()
    decode: tuple[DecodeServer, ...] = ()
    policy: Policy = "round_robin"
    workers: Annotated[int, Meta(ge=1, le=512)] = 1
    timeout_secs: PositiveFloat = 1800.0
    connect_timeout_secs: PositiveFloat = 10.0
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    # A stream event that arrives within this many ms of the previous write to the
    # client waits, unread, until that much time has passed, and goes out with the
    # events behind it in one write. The first two writes never wait, and no event
    # waits longer than this. 0 writes every piece as it arrives.
    stream_coalesce_ms: Annotated[float, Meta(ge=0, le=1000)] = 2.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # resilience
    max_attempts: Annotated[int, Meta(ge=1, le=10)] = 3
    retry_backoff_secs: Annotated[float, Meta(ge=0)] = 0.05
    max_in_flight: Annotated[int, Meta(ge=0)] = 0
    health_check_interval_secs: PositiveFloat = 5.0
    health_check_timeout_secs: PositiveFloat = 2.0
    health_failure_threshold: Annotated[int, Meta(ge=1)] = 2
    health_success_threshold: Annotated[int, Meta(ge=1)] = 1
    admin_key: str | None = None
    api_key: str | None = None
    # observability
    access_log: Literal["off", "plain", "json"] = "off"

    def __post_init__(self) -> None:
        if not self.prefill:
            raise ValueError("no prefill server configured; give at least one (--prefill URL)")
        if not self.decode:
            raise ValueError("no decode server configured; give at least one (--decode URL)")
        for role, urls in (
            ("prefill", [s.url.rstrip("/") for s in self.prefill]),
            ("decode", [s.url.rstrip("/") for s in self.decode]),
        ):
            seen: set[str] = set()
            for url in urls:
                if url in seen:
                    raise ValueError(f"{role} URL {url!r} is listed twice")
                seen.add(url)

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def _convert(data: Any, source: str) -> Config:
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def build(**values: Any) -> Config:
    """Validate keyword values (as from the CLI) into a Config."""
    return _convert({k: v for k, v in values.items() if v is not None}, "configuration")


def load_file(path: str | os.PathLike[str], **overrides: Any) -> Config:
    """Read a TOML file; keyword overrides that are not None win over the file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None
    try:
        data = msgspec.toml.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a TOML table")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _convert(data, f"config file {str(p)!r}")


def from_json(text: str) -> Config:
    try:
        return msgspec.json.decode(text, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"configuration: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"configuration JSON is malformed: {exc}") from None


def from_env(environ: dict[str, str] | None = None) -> Config:
    """The configuration a Gunicorn worker was started with.

    `minilb serve` passes the validated config as JSON in MINILB_CONFIG_JSON; a plain
    `gunicorn -c gunicorn.conf.py minilb.app:app` reads the TOML file in MINILB_CONFIG.
    """
    env = os.environ if environ is None else environ
    if text := env.get(CONFIG_JSON_ENV):
        return from_json(text)
    if path := env.get(CONFIG_ENV):
        return load_file(path)
    raise ConfigError(
        f"no configuration: set {CONFIG_ENV}=FILE (a TOML file) or start with `minilb serve`"
    )


def bootstrap_host(url: str) -> str:
    """The host as SGLang expects it in `bootstrap_host`: IPv6 literals in brackets."""
    host = urlsplit(url).hostname or ""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host
