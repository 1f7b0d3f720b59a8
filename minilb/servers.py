"""The prefill and decode servers as minilb uses them at run time."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from minilb.config import Config, bootstrap_host

GENERATION_PATHS = ("/generate", "/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True, eq=False)
class Server:
    """One upstream server; URLs of the generation routes are parsed once."""

    role: str
    url: str
    bootstrap_port: int | None = None
    bootstrap_host: str = ""
    urls: dict[str, httpx.URL] = field(default_factory=dict)

    @classmethod
    def make(cls, role: str, url: str, bootstrap_port: int | None = None) -> Server:
        base = url.rstrip("/")
        return cls(
            role=role,
            url=base,
            bootstrap_port=bootstrap_port,
            bootstrap_host=bootstrap_host(base),
            urls={path: httpx.URL(base + path) for path in GENERATION_PATHS},
        )


@dataclass(frozen=True)
class ServerSet:
    prefill: tuple[Server, ...]
    decode: tuple[Server, ...]

    @classmethod
    def from_config(cls, config: Config) -> ServerSet:
        return cls(
            prefill=tuple(Server.make("prefill", s.url, s.bootstrap_port) for s in config.prefill),
            decode=tuple(Server.make("decode", s.url) for s in config.decode),
        )

    def all(self) -> tuple[Server, ...]:
        return self.prefill + self.decode
