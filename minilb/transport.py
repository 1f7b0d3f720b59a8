"""A lean HTTP/1.1 transport for httpx: asyncio protocols, httptools, keep-alive pools.

httpx's own client stack costs milliseconds per request here (see the README);
its transport interface is the seam. `LeanTransport.handle_async_request` takes
an `httpx.Request` and returns an `httpx.Response` whose stream reads straight
from the connection, so the hot path and the control plane (through
`httpx.AsyncClient(transport=...)`) share one pool of keep-alive connections.

Flow control: a connection stops reading from its socket while more than
`high_water` bytes of the body wait for the reader, so a slow client makes the
upstream server wait instead of making minilb buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

import httptools
import httpx

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed by the server before answering."""


class _Connection(asyncio.Protocol):
    """One upstream TCP connection; carries one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = True
        self._error: Exception | None = None
        self._got_bytes = False
        self._held = False  # reading paused by receive(not_before)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response from {self._pool.origin}: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        head = self._head
        if head is not None and not self._complete:
            if not self._got_bytes and self.reused:
                self._fail(_StaleConnection())
            elif exc is None and head.done() and self._ends_at_close():
                self._complete = True  # a body delimited by the end of the connection
                self._keep_alive = False
                self._wake()
            else:
                self._fail(httpx.ReadError(f"{self._pool.origin} closed the connection"))
        self._pool.forget(self)

    def _ends_at_close(self) -> bool:
        """The response has neither Content-Length nor chunked framing (old HTTP/1.0 style)."""
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_result((self._parser.get_status_code(), self._headers))

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    # used by LeanTransport and _ResponseStream

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        self._wake()

    def send(self, data: bytes) -> asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]]:
        assert self._transport is not None
        self._head = self._pool.loop.create_future()
        self._chunks.clear()
        self._buffered = 0
        self._complete = False
        self._error = None
        self._got_bytes = False
        self._transport.write(data)
        return self._head

    async def receive(self, not_before: float = 0.0) -> bytes:
        """All of the response body that has arrived and was not read yet; b"" at its end.

        Pieces that arrived together are joined, so a burst of stream events goes
        on to the client in one write instead of one write per event. A piece that
        arrives before `not_before` (a loop time) waits until then for the pieces
        behind it.
        """
        chunks = self._chunks
        while not chunks:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._pool.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        ready = self._complete or self._error is not None or self._paused
        if not_before and not ready and self._pool.loop.time() < not_before:
            await self._hold(not_before)
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self._buffered < _LOW_WATER and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    async def _hold(self, until: float) -> None:
        """Leave what follows in the socket until `until`, then read it all in one go.

        Reading is paused meanwhile, so the events of a burst cost neither a read
        nor a wake-up each; the upstream server's writes only fill the socket buffer.
        """
        assert self._transport is not None
        loop = self._pool.loop
        self._waiter = waiter = loop.create_future()
        self._held = True
        self._transport.pause_reading()
        timer = loop.call_at(until, self._end_hold, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._held:  # cancelled before the time was up
                timer.cancel()
                self._held = False
                if not self.closed:
                    self._transport.resume_reading()

    def _end_hold(self, waiter: asyncio.Future[None]) -> None:
        self._held = False
        if not self.closed and self._transport is not None:
            self._transport.resume_reading()
        # Resolved one callback later, the waiter wakes the reader after the loop's
        # next poll (asyncio and uvloop alike), so it finds what the socket held;
        # resolved here, the reader would run first and find nothing new.
        self._pool.loop.call_soon(_resolve, waiter)

    def finish(self) -> None:
        """Give the connection back to the pool when the response ended cleanly, else close."""
        head, self._head = self._head, None
        if head is not None and self._complete and self._keep_alive and not self.closed:
            self._pool.release(self)
        else:
            self.abort()

    def abort(self) -> None:
        self._head = None
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()
            self._pool.forget(self)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Reader(Protocol):
    def __call__(self, not_before: float = 0.0, /) -> Awaitable[bytes]: ...


class RawResponse:
    """A response head and its body, without httpx's objects (the hot path).

    `read()` returns the next piece of the body, b"" at its end (`read(not_before)`:
    see `_Connection.receive`); `stream.aclose()` gives the connection back (or
    closes it when the body was not read to its end).
    """

    __slots__ = ("headers", "read", "status", "stream")

    def __init__(
        self, status: int, headers: list[tuple[bytes, bytes]], stream: httpx.AsyncByteStream
    ) -> None:
        self.status = status
        self.headers = headers
        self.stream = stream
        self.read: Reader = (
            stream.receive if isinstance(stream, _ResponseStream) else _reader(stream)
        )

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _reader(stream: httpx.AsyncByteStream) -> Reader:
    chunks = stream.__aiter__()

    async def read(not_before: float = 0.0, /) -> bytes:
        async for chunk in chunks:
            if chunk:
                return chunk
        return b""

    return read


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.receive = conn.receive
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        receive = self._conn.receive
        while chunk := await receive():
            yield chunk

    async def aclose(self) -> None:
        # Idempotent: once released, the connection may already carry another request.
        if not self._closed:
            self._closed = True
            self._conn.finish()


class _Pool:
    """Idle keep-alive connections to one origin, most recently used first."""

    def __init__(self, transport: LeanTransport, host: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        self._transport = transport
        self.host = host
        self.port = port
        self.origin = f"http://{host}:{port}"
        self._idle: deque[_Connection] = deque()
        self.open: set[_Connection] = set()

    async def acquire(self) -> _Connection:
        idle = self._idle
        expire_before = self.loop.time() - self._transport.keepalive_expiry
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < expire_before:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return await self._connect()

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self._transport.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {self.origin}") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.origin}: {exc.strerror or exc}") from None
        self.open.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if len(self._idle) > self._transport.max_idle:
            self._idle.popleft().abort()

    def forget(self, conn: _Connection) -> None:
        self.open.discard(conn)

    def close(self) -> None:
        for conn in list(self.open):
            conn.abort()
        self._idle.clear()


class LeanTransport(httpx.AsyncBaseTransport):
    """Plain-HTTP/1.1 keep-alive transport; one per worker process and event loop."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        keepalive_expiry: float = 4.0,
        max_idle: int = 1024,
    ) -> None:
        self.connect_timeout = connect_timeout
        # Below uvicorn's and SGLang's 5 s keep-alive, so minilb drops an idle
        # connection before the server does, instead of racing its close.
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self._pools: dict[tuple[str, int], _Pool] = {}

    def _pool(self, url: httpx.URL) -> _Pool:
        key = (url.host, url.port or 80)
        pool = self._pools.get(key)
        if pool is None:
            if url.scheme != "http":
                raise httpx.UnsupportedProtocol(f"minilb's transport speaks http only, not {url}")
            pool = self._pools[key] = _Pool(self, key[0], key[1])
        return pool

    @property
    def open_connections(self) -> int:
        return sum(len(pool.open) for pool in self._pools.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        for name, value in request.headers.raw:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        head.append(body)
        timeout = request.extensions.get("timeout", {}).get("read")
        raw = await self.send_raw(request.url, b"".join(head), timeout)
        return httpx.Response(
            raw.status,
            headers=raw.headers,
            stream=raw.stream,
            extensions={"http_version": b"HTTP/1.1"},
            request=request,
        )

    async def send_raw(
        self, url: httpx.URL, data: bytes, read_timeout: float | None = None
    ) -> RawResponse:
        """Send a request already rendered as bytes (head and body) to `url`'s origin.

        The hot path renders each server's request head once and calls this
        directly, skipping the ~15 µs of building `httpx.Request`/`Response`.
        """
        pool = self._pool(url)
        for attempt in (1, 2):
            conn = await pool.acquire()
            try:
                waiting = conn.send(data)
                if read_timeout is None:
                    status, headers = await waiting
                else:
                    status, headers = await asyncio.wait_for(waiting, read_timeout)
            except _StaleConnection:
                if attempt == 1:
                    continue
                raise httpx.ReadError(f"{pool.origin} closed the connection") from None
            except TimeoutError:
                conn.abort()
                raise httpx.ReadTimeout(f"{pool.origin} did not answer in {read_timeout} s") from None
            except BaseException:
                conn.abort()
                raise
            return RawResponse(status, headers, _ResponseStream(conn))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
