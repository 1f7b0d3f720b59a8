"""The control-plane routes: fan-outs to every server and info from a prefill server.

Convenience matters more than microseconds here, so these use an
`httpx.AsyncClient` (over the same lean transport as the hot path).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec

from minilb.errors import UpstreamFailed
from minilb.membership import Membership
from minilb.responses import send_bytes
from minilb.servers import Server
from minilb.types import Send

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class ControlPlane:
    def __init__(self, membership: Membership, client: httpx.AsyncClient) -> None:
        self.membership = membership
        self.client = client

    async def _call(self, server: Server, method: str, path: str) -> tuple[int, bytes, str | None]:
        try:
            response = await self.client.request(method, server.url + path)
        except httpx.HTTPError as exc:
            return 0, b"", f"{type(exc).__name__}: {exc}"
        return response.status_code, response.content, None

    async def fan_out(self, send: Send, method: str, path: str) -> None:
        """Call every server; 200 only when all answer 200, else 503 with each result."""
        servers = self.membership.servers().all()
        results = await asyncio.gather(*(self._call(s, method, path) for s in servers))
        report: list[dict[str, Any]] = []
        for server, (status, body, error) in zip(servers, results, strict=True):
            entry: dict[str, Any] = {"role": server.role, "url": server.url, "status": status}
            if error is not None:
                entry["error"] = error
            elif status != 200:
                entry["error"] = body[:500].decode("utf-8", "replace")
            report.append(entry)
        healthy = all(entry["status"] == 200 for entry in report)
        payload: dict[str, Any] = {"servers": report}
        if not healthy:
            failed = [f"{e['role']} {e['url']}" for e in report if e["status"] != 200]
            payload["error"] = {
                "message": f"{path} failed on {len(failed)} server(s): {', '.join(failed)}",
                "type": "service_unavailable_error",
                "code": 503,
            }
        await send_bytes(send, 200 if healthy else 503, _encoder.encode(payload))

    async def server_info(self, send: Send) -> None:
        """mini_lb's shape: `{"internal_states": [...], "prefill": [...], "decode": [...]}`."""
        servers = self.membership.servers().all()
        results = await asyncio.gather(*(self._call(s, "GET", "/get_server_info") for s in servers))
        infos: dict[str, list[Any]] = {"prefill": [], "decode": []}
        for server, (status, body, error) in zip(servers, results, strict=True):
            if error is not None or status != 200:
                reason = error or f"status {status}"
                raise UpstreamFailed(f"{server.role} server {server.url} /get_server_info: {reason}")
            try:
                infos[server.role].append(_decoder.decode(body))
            except msgspec.DecodeError:
                raise UpstreamFailed(
                    f"{server.role} server {server.url} /get_server_info answered invalid JSON"
                ) from None
        states: list[Any] = []
        for info in infos["decode"]:
            if isinstance(info, dict) and isinstance(info.get("internal_states"), list):
                states.extend(info["internal_states"])
        payload = {"internal_states": states, "prefill": infos["prefill"], "decode": infos["decode"]}
        await send_bytes(send, 200, _encoder.encode(payload))

    async def from_prefill(self, send: Send, path: str) -> None:
        """The first prefill server's answer to a GET; errors name every server tried."""
        errors = []
        for server in self.membership.servers().prefill:
            status, body, error = await self._call(server, "GET", path)
            if error is None and status == 200:
                await send_bytes(send, 200, body)
                return
            errors.append(f"{server.url}: {error or f'status {status}'}")
        raise UpstreamFailed(f"no prefill server answered {path} ({'; '.join(errors)})")
