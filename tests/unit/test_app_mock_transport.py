"""The whole app driven in memory: ASGI messages in, httpx.MockTransport as the servers."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import httpx

from minilb.app import create_app
from minilb.config import build

CONFIG = build(
    prefill=[{"url": "http://prefill.test:30000", "bootstrap_port": 30001}],
    decode=[{"url": "http://decode.test:31000"}],
    max_attempts=2,
)


def run(app: Any, method: str, path: str, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one request through the ASGI app; return status, headers and body."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # no disconnect while the request runs
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"x-request-id", b"unit-1")]}
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_pair_through_a_mock_transport() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        role = "prefill" if request.url.host == "prefill.test" else "decode"
        return httpx.Response(200, json={"text": role, "meta_info": {"id": "x"}})

    app = create_app(CONFIG, transport=httpx.MockTransport(server))
    status, headers, body = run(app, "POST", "/generate", b'{"text": "hi"}')
    assert status == 200 and json.loads(body)["text"] == "decode"
    assert headers[b"x-request-id"] == b"unit-1"
    assert sorted(r.url.host for r in seen) == ["decode.test", "prefill.test"]
    bodies = [json.loads(r.content) for r in seen]
    assert bodies[0] == bodies[1]
    assert bodies[0]["bootstrap_host"] == "prefill.test" and bodies[0]["bootstrap_port"] == 30001
    assert all(r.headers["x-request-id"] == "unit-1" for r in seen)


def test_a_decode_5xx_is_retried_then_reported() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        if request.url.host == "decode.test":
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return httpx.Response(200, json={"text": "p"})

    app = create_app(CONFIG, transport=httpx.MockTransport(server))
    status, _, body = run(app, "POST", "/generate", b'{"text": "hi"}')
    error = json.loads(body)["error"]
    assert status == 502 and "overloaded" in error["message"] and error["request_id"] == "unit-1"


def test_bad_input_never_reaches_the_transport() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request should be sent")

    app = create_app(CONFIG, transport=httpx.MockTransport(server))
    assert run(app, "POST", "/generate", b"{nope")[0] == 400
    assert run(app, "GET", "/generate", b"")[0] == 405
    assert run(app, "POST", "/nowhere", b"{}")[0] == 404


class _Cycle:
    """Holds the scope and offers `send` as a bound method, as a server's request cycle does."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"text": "hi"}', "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def test_a_request_leaves_no_reference_cycle_behind() -> None:
    """Cyclic garbage waits for the GC, whose pauses show as tail latency under load."""

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"text": "t"}', headers={"content-type": "application/json"})

    app = create_app(CONFIG, transport=httpx.MockTransport(server))

    async def main() -> int:
        for _ in range(3):  # warm up: the runtime, the pools, the first import of everything
            cycle = _Cycle({"type": "http", "method": "POST", "path": "/generate", "headers": []})
            await app(cycle.scope, cycle.receive, cycle.send)
        gc.collect()
        gc.disable()
        try:
            for _ in range(100):
                cycle = _Cycle({"type": "http", "method": "POST", "path": "/generate", "headers": []})
                await app(cycle.scope, cycle.receive, cycle.send)
                assert cycle.sent[0]["status"] == 200
            del cycle
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(main()) < 100, "objects in reference cycles after 100 requests"
