"""Membership at run time: SGLang's `/register` and the `/workers` API."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import unquote

import msgspec

from minilb.config import PrefillServer
from minilb.errors import BadRequest
from minilb.membership import Membership
from minilb.responses import send_bytes
from minilb.servers import Role
from minilb.types import Send

_encoder = msgspec.json.Encoder()


class _Register(msgspec.Struct, forbid_unknown_fields=True):
    mode: Literal["prefill", "decode"]
    registry_url: str
    bootstrap_port: int | None = None


class _NewWorker(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    role: Literal["prefill", "decode"]
    bootstrap_port: int | None = None


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def _validate(role: Role, url: str, bootstrap_port: int | None) -> None:
    try:
        PrefillServer(url=url, bootstrap_port=bootstrap_port)  # the same URL and port rules
    except (ValueError, TypeError) as exc:
        raise BadRequest(str(exc).replace("prefill URL", f"{role} URL")) from None
    if bootstrap_port is not None and not 1 <= bootstrap_port <= 65535:
        raise BadRequest(f"bootstrap_port {bootstrap_port} is not a port (1-65535)")


class Admin:
    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def _add(self, role: Role, url: str, bootstrap_port: int | None) -> dict[str, Any]:
        _validate(role, url, bootstrap_port)
        record = self.membership.add(role, url, bootstrap_port)
        return {"role": record.role, "url": record.url, "bootstrap_port": record.bootstrap_port}

    async def register(self, send: Send, body: bytes) -> None:
        """SGLang's registration: prefill must give its bootstrap port, decode must not."""
        req: _Register = _decode(body, _Register)
        if req.mode == "prefill" and req.bootstrap_port is None:
            raise BadRequest("a prefill server must register with its bootstrap_port")
        if req.mode == "decode" and req.bootstrap_port is not None:
            raise BadRequest("a decode server must not register a bootstrap_port")
        added = self._add(req.mode, req.registry_url, req.bootstrap_port)
        await send_bytes(send, 200, _encoder.encode({"status": "registered", **added}))

    async def add_worker(self, send: Send, body: bytes) -> None:
        req: _NewWorker = _decode(body, _NewWorker)
        if req.role == "decode" and req.bootstrap_port is not None:
            raise BadRequest("a decode server has no bootstrap_port")
        added = self._add(req.role, req.url, req.bootstrap_port)
        await send_bytes(send, 201, _encoder.encode(added))

    async def list_workers(self, send: Send) -> None:
        servers = self.membership.servers().all()
        workers = [
            {
                "role": s.role,
                "url": s.url,
                "bootstrap_port": s.bootstrap_port,
                "healthy": s.healthy,
                "in_flight": self.membership.in_flight(s.id),
            }
            for s in servers
        ]
        await send_bytes(send, 200, _encoder.encode({"workers": workers}))

    async def remove_worker(self, send: Send, path: str) -> None:
        url = unquote(path.removeprefix("/workers/"))
        record = self.membership.remove(url)
        await send_bytes(send, 200, _encoder.encode({"removed": record.url, "role": record.role}))
