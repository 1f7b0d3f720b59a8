"""What minilb records about each request: its ID, the pair, timings, and the access log line."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Literal

import msgspec

from minilb.types import Message, Scope, Send

AccessLog = Literal["off", "plain", "json"]

# Correlation headers a client may send, in order of preference.
_ID_HEADERS = (b"x-request-id", b"x-correlation-id", b"request-id", b"x-amzn-trace-id")
_encoder = msgspec.json.Encoder()


def request_id(scope: Scope) -> bytes:
    """The client's correlation ID if it sent one (up to 200 bytes), else a new one."""
    for name, value in scope["headers"]:
        if name in _ID_HEADERS and 0 < len(value) <= 200:
            return bytes(value)
    return os.urandom(16).hex().encode()


class RequestLog:
    """Filled in while a request is handled; `send` wraps the ASGI send to observe the answer."""

    __slots__ = (
        "bytes", "decode", "first_byte", "method", "path", "prefill", "raw_send", "rid", "room",
        "start", "status", "streamed", "upstream_ttfb",
    )

    def __init__(self, scope: Scope, send: Send, rid: bytes) -> None:
        self.raw_send = send  # the server's own send, for the stream's hot loop
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.rid = rid
        self.start = time.perf_counter()
        self.status = 0
        self.bytes = 0
        self.first_byte = 0.0
        self.prefill = ""
        self.decode = ""
        self.room: int | list[int] | None = None
        self.upstream_ttfb = 0.0
        self.streamed = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message["headers"] = [*message["headers"], (b"x-request-id", self.rid)]
        else:
            body = message.get("body", b"")
            if body and not self.bytes:
                self.first_byte = time.perf_counter() - self.start
                self.streamed = message.get("more_body", False)
            self.bytes += len(body)
        await self.raw_send(message)

    def line(self, kind: AccessLog, seconds: float) -> str:
        fields = {
            "request_id": self.rid.decode("latin-1"),
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": round(seconds * 1000, 3),
            "prefill": self.prefill or None,
            "decode": self.decode or None,
            "room": self.room,
            "upstream_ttfb_ms": round(self.upstream_ttfb * 1000, 3) if self.upstream_ttfb else None,
            "bytes": self.bytes,
        }
        if kind == "json":
            return _encoder.encode(fields).decode()
        pair = f" prefill={self.prefill} decode={self.decode} room={self.room}" if self.prefill else ""
        ttfb = f" upstream_ttfb={fields['upstream_ttfb_ms']}ms" if self.upstream_ttfb else ""
        return (
            f'{fields["request_id"]} "{self.method} {self.path}" {self.status} '
            f"{fields['duration_ms']}ms{pair}{ttfb} bytes={self.bytes}"
        )


def access_logger(kind: AccessLog) -> logging.Logger | None:
    """A logger that writes one line per request to stdout, or None when it is off."""
    if kind == "off":
        return None
    logger = logging.getLogger("minilb.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
