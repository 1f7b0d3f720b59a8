"""The prefill's bootstrap listener and the decode's client for it.

A tiny HTTP/1.1 dialect over keep-alive loopback connections, one request at
a time per connection:

    GET /pair?room=R&peer=HOST:PORT&wait=SECS HTTP/1.1

answers 200 with the prefill's identity as the body once the prefill
request with room R is present, 408 when `wait` expired first, 409 when the
room is already taken (duplicate). `GET /health` answers 200. Written on
asyncio primitives rather than a framework so a pairing costs a few tens of
microseconds on each side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import parse_qsl, urlsplit

from minilb.sim.knobs import Knobs
from minilb.sim.pairing import DuplicateRoom, RoomRegistry

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    409: b"Conflict",
}


def _response(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        _REASONS[status],
        len(body),
        body,
    )


class ListenerProtocol(asyncio.Protocol):
    """One connection from a decode to the prefill's bootstrap listener."""

    def __init__(
        self,
        registry: RoomRegistry,
        knobs: Callable[[], Knobs],
        on_duplicate: Callable[[], None],
    ) -> None:
        self._registry = registry
        self._knobs = knobs
        self._on_duplicate = on_duplicate
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        if self._knobs().bootstrap_down:
            # "Listener down": accept then drop at once, like a crashed server.
            transport.abort()
            return
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._task is not None:
            self._task.cancel()  # the decode went away: stop waiting for its room

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._next()

    def _next(self) -> None:
        # Answer every complete request in the buffer until one has to wait.
        while self._task is None and self._transport is not None and self._handle_one():
            pass

    def _handle_one(self) -> bool:
        """Handle the next buffered request; False when none is complete."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._transport is None:
            return False
        if self._knobs().bootstrap_down:
            self._transport.abort()
            return False
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3:
            self._write(_response(400, b"bad request line"))
            return True
        target = urlsplit(parts[1])
        if target.path == "/health":
            self._write(_response(200, b"OK"))
            return True
        if target.path != "/pair":
            self._write(_response(404, b"not found"))
            return True
        try:
            query = dict(parse_qsl(target.query))
            room, peer, wait = int(query["room"]), query["peer"], float(query["wait"])
        except (KeyError, ValueError):
            self._write(_response(400, b"need room, peer and wait"))
            return True
        try:
            found = self._registry.join(room, peer)
        except DuplicateRoom:
            self._on_duplicate()
            self._write(_response(409, b"duplicate room"))
            return True
        if isinstance(found, str):
            self._write(_response(200, found.encode()))
            return True
        wait = min(wait, self._knobs().pair_timeout)
        self._task = asyncio.get_running_loop().create_task(self._wait(room, found, wait))
        return True

    async def _wait(self, room: int, future: asyncio.Future[str], wait: float) -> None:
        try:
            identity = await asyncio.wait_for(asyncio.shield(future), wait)
        except (TimeoutError, asyncio.CancelledError):
            self._registry.unwait(room, future)
            if self._transport is not None:
                self._write(_response(408, b"room not seen"))
        else:
            self._write(_response(200, identity.encode()))
        self._task = None
        self._next()

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)


async def start_listener(
    host: str,
    port: int,
    registry: RoomRegistry,
    knobs: Callable[[], Knobs],
    on_duplicate: Callable[[], None],
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: ListenerProtocol(registry, knobs, on_duplicate), host, port, reuse_address=True
    )


class PairTimeout(Exception):
    """The prefill never showed the room within the pair timeout."""


class BootstrapClient:
    """The decode's side: keep-alive connections to prefills' bootstrap listeners."""

    RETRY_DELAY = 0.05

    def __init__(self, identity: str) -> None:
        self.identity = identity  # the decode's own host:port, told to prefills
        self._idle: dict[
            tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        ] = {}

    async def pair(self, host: str, port: int, room: int, deadline: float) -> str:
        """Wait until the prefill at host:port has `room`; return the prefill's identity.

        Retries refused or dropped connections until `deadline` (a
        `time.monotonic()` value), then raises PairTimeout. Raises
        DuplicateRoom when the prefill says the room is taken.
        """
        connect_host = host[1:-1] if host.startswith("[") else host
        key = (connect_host, port)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PairTimeout(room)
            conn = None
            try:
                conn = await self._connection(key, remaining)
                status, body = await asyncio.wait_for(
                    self._exchange(conn, host, room, remaining), remaining + 1.0
                )
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                if conn is not None:
                    conn[1].close()
                # On 3.11 a cancellation that lands as a connect fails can be swallowed
                # (by wait_for); a request whose client left must not retry on.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None
                await asyncio.sleep(min(self.RETRY_DELAY, max(deadline - time.monotonic(), 0)))
                continue
            except BaseException:
                # Cancelled mid-request: the connection's state is unknown, drop it.
                if conn is not None:
                    conn[1].close()
                raise
            self._idle.setdefault(key, []).append(conn)
            if status == 200:
                return body.decode()
            if status == 409:
                raise DuplicateRoom(room)
            if status != 408:
                await asyncio.sleep(self.RETRY_DELAY)

    async def _connection(
        self, key: tuple[str, int], remaining: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        idle = self._idle.get(key)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.wait_for(asyncio.open_connection(*key), remaining)

    async def _exchange(
        self,
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        host: str,
        room: int,
        wait: float,
    ) -> tuple[int, bytes]:
        reader, writer = conn
        writer.write(
            b"GET /pair?room=%d&peer=%s&wait=%.3f HTTP/1.1\r\nHost: %s\r\n\r\n"
            % (room, self.identity.encode(), wait, host.encode())
        )
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
        return status, body

    async def close(self) -> None:
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        self._idle.clear()
