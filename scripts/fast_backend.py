#!/usr/bin/env python3
"""A stand-in prefill and decode server for benchmarks: as cheap as a Python server gets.

`minilb sim` is faithful (real pairing over its bootstrap listener, every
format, fault knobs) and costs about 150 µs per request on each side. On a
two-core machine that is enough for the simulators and the load generator to
fill their core before a fast balancer fills its own, so the benchmark would
measure the load side. This server answers from pre-rendered bytes on raw
asyncio protocols (uvloop when present) and does no pairing: it only checks
that the balancer added `bootstrap_room`, answering 400 if not.

    python scripts/fast_backend.py --prefill-port 31001 --decode-port 31003

Both roles run in one process, one listening port each. POST /generate (and
the OpenAI routes) answer like SGLang's /generate: JSON, or with "stream": true
one SSE event per output token, each written to the socket on its own, then
`data: [DONE]`. Any GET answers a small JSON body, so health checks and the
peers' start-up probes pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
from typing import Any

import httptools
import msgspec


class _Sampling(msgspec.Struct):
    max_new_tokens: int = 16


class _View(msgspec.Struct):
    stream: bool = False
    sampling_params: _Sampling = msgspec.field(default_factory=_Sampling)
    max_tokens: int | None = None


_decode_view = msgspec.json.Decoder(_View).decode
_JSON = b"content-type: application/json\r\n"


def _response(status: int, body: bytes) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request"}.get(status, b"Error")
    return b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\n\r\n%s" % (status, reason, _JSON, len(body), body)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _result(n: int, done: bool, prefill: bool) -> dict[str, Any]:
    return {
        "text": " ".join(f"tok{i}" for i in range(n)),
        "output_ids": list(range(n)),
        "meta_info": {
            "id": "fast-backend",
            "finish_reason": {"type": "length", "length": n} if done else None,
            "prompt_tokens": 16,
            "completion_tokens": n,
            "cached_tokens": 0,
            "e2e_latency": 0.0,
            "disaggregation_mode": "prefill" if prefill else "decode",
        },
    }


@functools.lru_cache(maxsize=256)
def _whole(n: int, prefill: bool) -> bytes:
    return _response(200, json.dumps(_result(min(n, 1) if prefill else n, True, prefill)).encode())


@functools.lru_cache(maxsize=256)
def _events(n: int, prefill: bool) -> tuple[bytes, ...]:
    """The stream's pieces as written: head + first event, one per later event, the end."""
    n = min(n, 1) if prefill else n
    events = [b"data: %s\n\n" % json.dumps(_result(i, i == n, prefill)).encode() for i in range(1, n + 1)]
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    pieces = [_chunk(e) for e in events] or [b""]
    pieces[0] = head + pieces[0]
    pieces.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return tuple(pieces)


_GET_BODY = {
    b"/get_model_info": b'{"model_path":"fast-backend","tokenizer_path":null,"is_generation":true}',
    b"/v1/models": b'{"object":"list","data":[{"id":"fast-backend","object":"model","owned_by":"minilb"}]}',
}


class _Server(asyncio.Protocol):
    def __init__(self, prefill: bool) -> None:
        self.prefill = prefill
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(_response(400, b'{"error":"bad request"}'))
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        if self.parser.get_method() != b"POST":
            path = self.url.split(b"?", 1)[0]
            transport.write(_response(200, _GET_BODY.get(path, b'{"status":"ok"}')))
            return
        body = b"".join(self.body)
        if b'"bootstrap_room"' not in body:
            transport.write(_response(400, b'{"error":"no bootstrap_room"}'))
            return
        try:
            view = _decode_view(body)
        except msgspec.DecodeError:
            transport.write(_response(400, b'{"error":"malformed JSON"}'))
            return
        n = view.max_tokens if view.max_tokens is not None else view.sampling_params.max_new_tokens
        if not view.stream:
            transport.write(_whole(n, self.prefill))
            return
        for piece in _events(n, self.prefill):  # one write per event, as a server emits tokens
            transport.write(piece)


async def _main(host: str, prefill_port: int, decode_port: int) -> None:
    loop = asyncio.get_running_loop()
    for port, prefill in ((prefill_port, True), (decode_port, False)):
        await loop.create_server(lambda p=prefill: _Server(p), host, port, backlog=1024)
    print(f"fast backend: prefill {host}:{prefill_port}, decode {host}:{decode_port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--prefill-port", type=int, required=True)
    parser.add_argument("--decode-port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_main(args.host, args.prefill_port, args.decode_port))


if __name__ == "__main__":
    main()
