"""Forwarding one generation request to a (prefill, decode) pair.

Both requests go out at once. The client gets the decode's answer; its stream
is passed through chunk by chunk as it arrives. Three things can interrupt the
exchange, and each cancels the handling task with a reason recorded first:
the prefill failing (its done-callback), the client disconnecting (a watcher
on `receive()`), and the overall timeout. Whatever the reason, `finally`
closes both upstream requests, so no connection or task outlives the request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import httpx
import msgspec

from minilb import logprobs
from minilb.errors import (
    HTTPError,
    NoServerAvailable,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
)
from minilb.patch import RequestInfo, encode_fields, inject
from minilb.policy import Selector
from minilb.responses import send_bytes, send_error
from minilb.servers import Server, ServerSet
from minilb.types import Headers, Receive, Scope, Send

logger = logging.getLogger("minilb.proxy")

_FORWARDED_HEADERS = frozenset({b"authorization", b"x-request-id", b"traceparent"})
_ROOM_BITS = 63
_error_decoder = msgspec.json.Decoder()


class _Exchange:
    """Why the handling task was cancelled, and whether the answer was complete."""

    __slots__ = ("error", "finished", "reason", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.reason: str | None = None
        self.error: HTTPError | None = None
        self.finished = False

    def interrupt(self, reason: str, error: HTTPError | None = None) -> None:
        if self.reason is None and not self.finished and not self.task.done():
            self.reason = reason
            self.error = error
            self.task.cancel()


def _upstream_message(body: bytes) -> str:
    """The error text an SGLang server put in its body, in any of its shapes."""
    try:
        value = _error_decoder.decode(body)
    except msgspec.DecodeError:
        return body[:500].decode("utf-8", "replace").strip()
    if isinstance(value, dict):
        inner = value.get("error")
        for candidate in (inner.get("message") if isinstance(inner, dict) else inner, value.get("message")):
            if isinstance(candidate, str):
                return candidate
    return body[:500].decode("utf-8", "replace").strip()


def status_error(server: Server, status: int, body: bytes) -> HTTPError:
    message = f"{server.role} server {server.url} answered {status}: {_upstream_message(body)}"
    if 400 <= status < 500:
        return UpstreamRejected(message, status=status)
    return UpstreamFailed(message)


def transport_error(server: Server, exc: Exception) -> HTTPError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{server.role} server {server.url} timed out: {exc}")
    return UpstreamFailed(f"{server.role} server {server.url} failed: {exc}")


async def _read_all(response: httpx.Response) -> bytes:
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    try:
        return b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()


class PDProxy:
    """Sends each generation request to a prefill and a decode server together."""

    def __init__(
        self,
        servers: ServerSet,
        selector: Selector,
        transport: httpx.AsyncBaseTransport,
        *,
        timeout: float,
        rng: random.Random,
    ) -> None:
        self.servers = servers
        self.selector = selector
        self.transport = transport
        self.timeout = timeout
        self._rng = rng

    def pick(self) -> tuple[Server, Server]:
        prefill, decode = self.servers.prefill, self.servers.decode
        if not prefill or not decode:
            side = "prefill" if not prefill else "decode"
            raise NoServerAvailable(f"no {side} server is available")
        p, d = self.selector.pick(len(prefill), len(decode))
        return prefill[p], decode[d]

    def _rooms(self, info: RequestInfo) -> int | list[int]:
        bits = self._rng.getrandbits
        if info.batch_size is None:
            return bits(_ROOM_BITS)
        rooms: set[int] = set()
        while len(rooms) < info.batch_size:
            rooms.add(bits(_ROOM_BITS))
        return list(rooms)

    async def _prefill(self, request: httpx.Request, server: Server) -> bytes:
        try:
            response = await self.transport.handle_async_request(request)
            body = await _read_all(response)
        except httpx.TransportError as exc:
            raise transport_error(server, exc) from None
        if response.status_code >= 400:
            raise status_error(server, response.status_code, body)
        return body

    async def forward(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, info: RequestInfo
    ) -> None:
        prefill, decode = self.pick()
        payload = inject(
            body, encode_fields(prefill.bootstrap_host, prefill.bootstrap_port, self._rooms(info))
        )
        headers: Headers = [(b"content-type", b"application/json")]
        for name, value in scope["headers"]:
            if name in _FORWARDED_HEADERS:
                headers.append((name, value))
        path = scope["path"]
        task = asyncio.current_task()
        assert task is not None
        exchange = _Exchange(task)
        loop = asyncio.get_running_loop()

        def on_prefill_done(done: asyncio.Task[bytes]) -> None:
            if done.cancelled():
                return
            exc = done.exception()
            if exc is not None:
                error = exc if isinstance(exc, HTTPError) else UpstreamFailed(str(exc))
                exchange.interrupt("prefill", error)

        prefill_request = httpx.Request("POST", prefill.urls[path], headers=headers, content=payload)
        prefill_task = loop.create_task(self._prefill(prefill_request, prefill))
        prefill_task.add_done_callback(on_prefill_done)
        watcher = loop.create_task(_watch_disconnect(receive, exchange))
        decode_request = httpx.Request("POST", decode.urls[path], headers=headers, content=payload)
        response: httpx.Response | None = None
        started = False
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    response = await self.transport.handle_async_request(decode_request)
                except httpx.TransportError as exc:
                    raise transport_error(decode, exc) from None
                if response.status_code >= 400:
                    raise status_error(decode, response.status_code, await _read_all(response))
                content_type = response.headers.get("content-type", "application/json").encode()
                out_headers: Headers = [(b"content-type", content_type)]
                if not info.stream:
                    answer = await _read_all(response)
                    prefill_body = await _wait(prefill_task)
                    if info.return_logprob:
                        answer = logprobs.merge_json(answer, prefill_body)
                    exchange.finished = True
                    await send_bytes(send, response.status_code, answer, out_headers)
                    return
                merger = None
                if info.return_logprob:
                    metas = logprobs.prefill_stream_metas(await _wait(prefill_task))
                    merger = logprobs.EventMerger(metas)
                out_headers.append((b"cache-control", b"no-cache"))
                start = {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": out_headers,
                }
                stream = response.stream
                assert isinstance(stream, httpx.AsyncByteStream)
                # The client's response starts with the decode's first event, not its
                # headers: a failure before then is still answered as a plain error.
                async for chunk in stream:
                    if merger is not None:
                        chunk = merger.feed(chunk)
                        if not chunk:
                            continue
                    if not started:
                        await send(start)
                        started = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                tail = merger.flush() if merger is not None else b""
                await _wait(prefill_task)
                exchange.finished = True
                if not started:
                    await send(start)
                    started = True
                await send({"type": "http.response.body", "body": tail})
        except asyncio.CancelledError:
            if exchange.reason is None:
                raise  # the server is shutting down: not ours to swallow
            task.uncancel()
            if exchange.reason == "client":
                logger.info("client went away; closed %s and %s", prefill.url, decode.url)
                return
            assert exchange.error is not None
            await _fail(send, exchange.error, started)
        except TimeoutError:
            await _fail(
                send,
                UpstreamTimeout(
                    f"prefill {prefill.url} and decode {decode.url} did not finish within "
                    f"{self.timeout:g} s"
                ),
                started,
            )
        except HTTPError as error:
            await _fail(send, error, started)
        except httpx.TransportError as exc:
            await _fail(send, transport_error(decode, exc), started)
        finally:
            exchange.finished = True
            watcher.cancel()
            if not prefill_task.done():
                prefill_task.cancel()
            if response is not None:
                await response.aclose()


async def _wait(prefill_task: asyncio.Task[bytes]) -> bytes:
    """The prefill's body once it is done; its failure arrives as cancellation instead."""
    await asyncio.wait((prefill_task,))
    if prefill_task.cancelled() or prefill_task.exception() is not None:
        # on_prefill_done has interrupted us; let that cancellation land.
        await asyncio.sleep(0)
        raise UpstreamFailed("prefill request did not complete")
    return prefill_task.result()


async def _watch_disconnect(receive: Receive, exchange: _Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.interrupt("client")
            return


async def _fail(send: Send, error: HTTPError, started: bool) -> None:
    if error.status >= 500:
        logger.warning("%s", error.message)
    if not started:
        await send_error(send, error)
        return
    await send(
        {
            "type": "http.response.body",
            "body": b"data: " + error.body() + b"\n\ndata: [DONE]\n\n",
            "more_body": False,
        }
    )
