"""The prefill and decode servers as one worker sees them at a moment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import httpx
import msgspec

from minilb.config import bootstrap_host

Role = Literal["prefill", "decode"]
GENERATION_PATHS = ("/generate", "/v1/chat/completions", "/v1/completions")


class ServerRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One server as the shared table stores it."""

    id: int
    role: Role
    url: str
    bootstrap_port: int | None = None
    healthy: bool = True


@dataclass(frozen=True, eq=False)
class Server:
    """One upstream server; URLs of the generation routes are parsed once."""

    id: int
    role: Role
    url: str
    bootstrap_port: int | None = None
    healthy: bool = True
    bootstrap_host: str = ""
    urls: dict[str, httpx.URL] = field(default_factory=dict)
    # The start of each generation request's head, rendered once.
    heads: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def make(cls, record: ServerRecord) -> Server:
        base = record.url.rstrip("/")
        return cls(
            id=record.id,
            role=record.role,
            url=base,
            bootstrap_port=record.bootstrap_port,
            healthy=record.healthy,
            bootstrap_host=bootstrap_host(base),
            urls={path: httpx.URL(base + path) for path in GENERATION_PATHS},
            heads={
                path: b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                % (path.encode(), base.split("://", 1)[1].encode())
                for path in GENERATION_PATHS
            },
        )


@dataclass(frozen=True)
class ServerSet:
    """All servers, and the healthy ones that take new requests, by role."""

    prefill: tuple[Server, ...]
    decode: tuple[Server, ...]
    healthy_prefill: tuple[Server, ...]
    healthy_decode: tuple[Server, ...]

    @classmethod
    def of(cls, records: list[ServerRecord]) -> ServerSet:
        servers = [Server.make(r) for r in records]
        prefill = tuple(s for s in servers if s.role == "prefill")
        decode = tuple(s for s in servers if s.role == "decode")
        return cls(
            prefill=prefill,
            decode=decode,
            healthy_prefill=tuple(s for s in prefill if s.healthy),
            healthy_decode=tuple(s for s in decode if s.healthy),
        )

    def all(self) -> tuple[Server, ...]:
        return self.prefill + self.decode
