"""Forwarding one generation request to a (prefill, decode) pair.

Both requests go out at once. The client gets the decode's answer; its stream
is passed through chunk by chunk as it arrives. Three things can interrupt an
exchange, and each cancels the handling task with a reason recorded first:
the prefill failing (its done-callback), the client disconnecting (a watcher
on `receive()`), and the overall timeout. Whatever the reason, `finally`
closes both upstream requests, so no connection or task outlives the request.

A pair that fails before any byte went to the client (connection refused or
closed, or a 5xx from either side) is retried on another pair with a fresh
room; a 4xx is the client's answer and is never retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from minilb import logprobs
from minilb.accesslog import RequestLog
from minilb.errors import (
    HTTPError,
    NoServerAvailable,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
)
from minilb.membership import Membership
from minilb.metrics import Metrics
from minilb.patch import RequestInfo, encode_fields, inject
from minilb.policy import Selector
from minilb.responses import send_bytes, send_error
from minilb.servers import Server
from minilb.shared import SERVER_IN_FLIGHT
from minilb.transport import RawResponse
from minilb.types import Headers, Receive, Scope, Send
from minilb.upstream import Sender

logger = logging.getLogger("minilb.proxy")

_ROOM_BITS = 63
_error_decoder = msgspec.json.Decoder()


class _Exchange:
    """Why the handling task was cancelled, and whether the answer was complete."""

    __slots__ = (
        "attempt", "client_gone", "error", "finished", "live", "log", "reason", "task", "timer", "watcher",
    )

    def __init__(self, task: asyncio.Task[Any], log: RequestLog) -> None:
        self.task = task
        self.log = log
        self.attempt = 0
        self.live = False  # an attempt is under way
        self.client_gone = False
        self.reason: str | None = None
        self.error: HTTPError | None = None
        self.finished = False
        self.watcher: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def interrupt(self, reason: str, error: HTTPError | None = None) -> None:
        self.client_gone |= reason == "client"
        if self.reason is None and not self.finished and not self.task.done():
            self.reason = reason
            self.error = error
            self.task.cancel()

    def watch(self, receive: Receive) -> None:
        """Start watching for the client going away."""
        if not self.finished:
            self.watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, self))


class _Retry(Exception):
    """The pair failed before the client saw a byte; try another pair."""

    def __init__(self, error: HTTPError, server: Server) -> None:
        self.error = error
        self.server = server


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


class ServerFailed(UpstreamFailed):
    """A 502 that names the server it came from, so a retry can avoid it."""

    def __init__(self, message: str, server: Server) -> None:
        super().__init__(message)
        self.server = server


def status_error(server: Server, status: int, body: bytes) -> HTTPError:
    message = f"{server.role} server {server.url} answered {status}: {_upstream_message(body)}"
    if 400 <= status < 500:
        return UpstreamRejected(message, status=status)
    return ServerFailed(message, server)


def transport_error(server: Server, exc: Exception) -> HTTPError:
    # A connect timeout is a server out of reach, like a refused connection: worth a
    # retry elsewhere. Other timeouts come from the request's own deadline.
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout(f"{server.role} server {server.url} timed out: {exc}")
    return ServerFailed(f"{server.role} server {server.url} failed: {exc}", server)


async def _read_all(response: RawResponse) -> bytes:
    read = response.read
    chunks = []
    try:
        while chunk := await read():
            chunks.append(chunk)
    finally:
        await response.stream.aclose()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# A request shorter than this never starts a disconnect watcher: a task per
# request costs more than the little a fast request could save by stopping early.
_WATCH_AFTER = 0.05


class PDProxy:
    """Sends each generation request to a prefill and a decode server together."""

    def __init__(
        self,
        membership: Membership,
        selector: Selector,
        sender: Sender,
        *,
        timeout: float,
        rng: random.Random,
        metrics: Metrics,
        max_attempts: int = 1,
        backoff: float = 0.0,
        stream_window: float = 0.0,
        forward_headers: frozenset[bytes] = frozenset({b"authorization", b"traceparent"}),
    ) -> None:
        self.metrics = metrics
        self.membership = membership
        self.selector = selector
        self.sender = sender
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.stream_window = stream_window
        self.forward_headers = forward_headers
        self._rng = rng
        self._add = membership.shared.add

    def pick(self, avoid: set[int]) -> tuple[Server, Server]:
        servers = self.membership.servers()
        prefill, decode = servers.healthy_prefill, servers.healthy_decode
        if not prefill or not decode:
            side = "prefill" if not prefill else "decode"
            total = len(servers.prefill if side == "prefill" else servers.decode)
            raise NoServerAvailable(
                f"no healthy {side} server is available ({total} configured, all unhealthy)"
                if total
                else f"no {side} server is registered"
            )
        if avoid:
            prefill = tuple(s for s in prefill if s.id not in avoid) or prefill
            decode = tuple(s for s in decode if s.id not in avoid) or decode
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

    def _timeout_error(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"the request did not finish within {self.timeout:g} s")

    async def forward(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, info: RequestInfo, log: RequestLog
    ) -> None:
        """Answer the client through `send` (the request log's wrapper)."""
        headers: Headers = [(b"x-request-id", log.rid)]
        for name, value in scope["headers"]:
            if name in self.forward_headers:
                headers.append((name, value))
        task = asyncio.current_task()
        assert task is not None
        exchange = _Exchange(task, log)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        # One timer per request: most finish before it fires.
        exchange.timer = loop.call_later(min(_WATCH_AFTER, self.timeout), self._a_while_later,
                                         exchange, receive, deadline)
        avoid: set[int] = set()
        try:
            for attempt in range(1, self.max_attempts + 1):
                if exchange.client_gone:
                    return
                if loop.time() >= deadline:
                    await send_error(send, self._timeout_error(), request_id=log.rid)
                    return
                exchange.attempt = attempt
                prefill, decode = self.pick(avoid)
                try:
                    await self._exchange(send, scope["path"], body, headers, info, exchange,
                                         prefill, decode, last=attempt == self.max_attempts)
                    return
                except _Retry as retry:
                    avoid.add(retry.server.id)
                    self.metrics.retry()
                    logger.warning("attempt %d failed, retrying on another pair: %s",
                                   attempt, retry.error.message)
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        except NoServerAvailable as error:
            await send_error(send, error, request_id=log.rid)
        except asyncio.CancelledError:
            # Between two attempts: the client left, or the time ran out.
            if exchange.reason not in ("client", "timeout"):
                raise
            task.uncancel()
            if exchange.reason == "timeout" and exchange.error is not None:
                await send_error(send, exchange.error, request_id=log.rid)
        finally:
            exchange.finished = True
            if exchange.timer is not None:
                exchange.timer.cancel()
            if exchange.watcher is not None:
                exchange.watcher.cancel()

    def _a_while_later(self, exchange: _Exchange, receive: Receive, deadline: float) -> None:
        """The request is still running: watch for the client leaving, and arm its deadline."""
        exchange.watch(receive)
        exchange.timer = asyncio.get_running_loop().call_at(deadline, self._time_is_up, exchange)

    def _time_is_up(self, exchange: _Exchange) -> None:
        exchange.interrupt("timeout", self._timeout_error())

    async def _post(self, server: Server, path: str, headers: Headers, payload: bytes) -> RawResponse:
        """Send to one server, counting the request, its errors and its time to respond."""
        start = time.perf_counter()
        try:
            response = await self.sender.post(server, path, headers, payload)
        except httpx.TransportError as exc:
            self.metrics.upstream(server, time.perf_counter() - start, failed=True)
            raise transport_error(server, exc) from None
        self.metrics.upstream(server, time.perf_counter() - start, failed=response.status >= 500)
        return response

    async def _prefill(self, server: Server, path: str, headers: Headers, payload: bytes) -> bytes:
        response = await self._post(server, path, headers, payload)
        try:
            body = await _read_all(response)
        except httpx.TransportError as exc:
            raise transport_error(server, exc) from None
        if response.status >= 400:
            raise status_error(server, response.status, body)
        return body

    async def _exchange(
        self,
        send: Send,
        path: str,
        body: bytes,
        headers: Headers,
        info: RequestInfo,
        exchange: _Exchange,
        prefill: Server,
        decode: Server,
        *,
        last: bool,
    ) -> None:
        """One attempt on one pair; raises _Retry when another pair may succeed."""
        rooms = self._rooms(info)
        payload = inject(body, encode_fields(prefill.bootstrap_host, prefill.bootstrap_port, rooms))
        log = exchange.log
        log.prefill, log.decode, log.room = prefill.url, decode.url, rooms
        self.metrics.selected(prefill)
        self.metrics.selected(decode)
        task = exchange.task
        exchange.reason = exchange.error = None
        exchange.live = True
        add = self._add
        add(SERVER_IN_FLIGHT + 8 * prefill.id, 1)
        add(SERVER_IN_FLIGHT + 8 * decode.id, 1)
        prefill_task = asyncio.get_running_loop().create_task(self._prefill(prefill, path, headers, payload))
        prefill_task.add_done_callback(_on_prefill_done(exchange, exchange.attempt))
        response: RawResponse | None = None
        started = False
        try:
            sent_at = time.perf_counter()
            response = await self._post(decode, path, headers, payload)
            log.upstream_ttfb = time.perf_counter() - sent_at
            if response.status >= 400:
                raise status_error(decode, response.status, await _read_all(response))
            content_type = response.header(b"content-type") or b"application/json"
            if not info.stream:
                answer = await _read_all(response)
                if info.return_logprob:
                    answer = logprobs.merge_json(answer, await _wait(prefill_task))
                exchange.finished = True
                out = [(b"content-type", content_type), (b"content-length", b"%d" % len(answer))]
                await send_bytes(send, response.status, answer, out)
                await _settle(prefill_task)
                return
            merger = None
            if info.return_logprob:
                metas = logprobs.prefill_stream_metas(await _wait(prefill_task))
                merger = logprobs.EventMerger(metas)
            start = {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache")],
            }
            # The client's response starts with the decode's first event, not its
            # headers: a failure before then can still be retried or answered plainly.
            read, raw_send = response.read, log.raw_send
            window, clock = self.stream_window, asyncio.get_running_loop().time
            not_before = 0.0
            writes = 0
            while chunk := await read(not_before):
                if merger is not None:
                    chunk = merger.feed(chunk)
                    if not chunk:
                        continue
                if started:
                    # The hot loop of a stream: past the request log's wrapper.
                    log.bytes += len(chunk)
                    await raw_send({"type": "http.response.body", "body": chunk, "more_body": True})
                else:
                    await send(start)
                    started = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                writes += 1
                if window and writes > 1:
                    # Events that follow within the window go out together (see Config),
                    # after the first two writes: a chat stream opens with a role-only
                    # event right before the one that carries the first token.
                    not_before = clock() + window
            tail = merger.flush() if merger is not None else b""
            exchange.finished = True
            if not started:
                await send(start)
                started = True
            await send({"type": "http.response.body", "body": tail})
            await _settle(prefill_task)
        except asyncio.CancelledError:
            if exchange.reason is None:
                raise  # the server is shutting down: not ours to swallow
            task.uncancel()
            if exchange.reason == "client":
                logger.info("client went away; closed %s and %s", prefill.url, decode.url)
                return
            assert exchange.error is not None
            await self._fail(send, exchange.error, started, last or exchange.reason == "timeout", log.rid)
        except HTTPError as error:
            await self._fail(send, error, started, last, log.rid)
        except httpx.TransportError as exc:
            await self._fail(send, transport_error(decode, exc), started, last, log.rid)
        finally:
            exchange.live = False
            if not prefill_task.done():
                prefill_task.cancel()
            if response is not None:
                await response.stream.aclose()
            add(SERVER_IN_FLIGHT + 8 * prefill.id, -1)
            add(SERVER_IN_FLIGHT + 8 * decode.id, -1)

    async def _fail(self, send: Send, error: HTTPError, started: bool, last: bool, rid: bytes) -> None:
        if isinstance(error, ServerFailed) and not started and not last:
            raise _Retry(error, error.server)
        if error.status >= 500:
            logger.warning("request %s: %s", rid.decode("latin-1"), error.message)
        if not started:
            await send_error(send, error, request_id=rid)
            return
        await send({
            "type": "http.response.body",
            "body": b"data: " + error.body(rid) + b"\n\ndata: [DONE]\n\n",
            "more_body": False,
        })


def _on_prefill_done(exchange: _Exchange, attempt: int) -> Callable[[asyncio.Task[bytes]], None]:
    def callback(done: asyncio.Task[bytes]) -> None:
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None and exchange.live and exchange.attempt == attempt:
            error = exc if isinstance(exc, HTTPError) else UpstreamFailed(str(exc))
            exchange.interrupt("prefill", error)

    return callback


async def _wait(prefill_task: asyncio.Task[bytes]) -> bytes:
    """The prefill's body once it is done; its failure arrives as cancellation instead."""
    if not prefill_task.done():
        await asyncio.wait((prefill_task,))
    if prefill_task.cancelled() or prefill_task.exception() is not None:
        # _on_prefill_done has interrupted us; let that cancellation land.
        await asyncio.sleep(0)
        raise UpstreamFailed("prefill request did not complete")
    return prefill_task.result()


# How long a prefill may take to finish after its decode did. In SGLang the prefill
# answers once the KV cache is sent, before the decode can finish, so this is only
# for a prefill that is stuck: its connection is closed after this long.
_PREFILL_GRACE = 1.0


async def _settle(prefill_task: asyncio.Task[bytes]) -> None:
    """Let the prefill's answer end cleanly (so its connection is reused), within a grace.

    What `asyncio.wait((task,), timeout=...)` does, at half its cost (2.5 against
    4.8 µs with uvloop): it is on the path of most requests, as the decode often
    answers first.
    """
    if prefill_task.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    prefill_task.add_done_callback(wake)
    timer = loop.call_later(_PREFILL_GRACE, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        prefill_task.remove_done_callback(wake)


async def _watch_disconnect(receive: Receive, exchange: _Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.interrupt("client")
            return
