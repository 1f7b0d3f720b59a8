"""Sending one generation request to one server: the seam between the proxy and a transport.

`LeanSender` writes a request head rendered once per server and route straight
to `LeanTransport` (the hot path). `HttpxSender` goes through any httpx
transport's `handle_async_request`, so tests can swap in `httpx.MockTransport`.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from minilb.servers import Server
from minilb.transport import LeanTransport, RawResponse


class Sender(Protocol):
    async def post(
        self, server: Server, path: str, headers: list[tuple[bytes, bytes]], payload: bytes
    ) -> RawResponse: ...


class LeanSender:
    def __init__(self, transport: LeanTransport) -> None:
        self._transport = transport

    async def post(
        self, server: Server, path: str, headers: list[tuple[bytes, bytes]], payload: bytes
    ) -> RawResponse:
        parts = [server.heads[path]]
        for name, value in headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"content-length: %d\r\n\r\n" % len(payload))
        parts.append(payload)
        return await self._transport.send_raw(server.urls[path], b"".join(parts))


class HttpxSender:
    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def post(
        self, server: Server, path: str, headers: list[tuple[bytes, bytes]], payload: bytes
    ) -> RawResponse:
        request = httpx.Request(
            "POST", server.urls[path], headers=[(b"content-type", b"application/json"), *headers],
            content=payload,
        )
        response = await self._transport.handle_async_request(request)
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return RawResponse(response.status_code, response.headers.raw, stream)


def sender_for(transport: httpx.AsyncBaseTransport) -> Sender:
    if isinstance(transport, LeanTransport):
        return LeanSender(transport)
    return HttpxSender(transport)
