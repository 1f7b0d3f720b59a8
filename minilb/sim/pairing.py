"""The prefill's room registry: where prefill requests and decodes meet by room.

No I/O here: the HTTP app registers prefill requests, the bootstrap listener
joins decodes, and both sides wait on asyncio futures.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class DuplicateRoom(Exception):
    """A room is already in flight on this server (a balancer reused a room)."""

    def __init__(self, room: int) -> None:
        super().__init__(room)
        self.room = room


@dataclass(slots=True)
class _Slot:
    future: asyncio.Future[str]  # resolves with the decode's identity
    joined: bool = False


class RoomRegistry:
    """Rooms of the prefill requests in flight, and decodes waiting for one.

    Either side may arrive first: a decode that comes before its prefill
    request waits (bounded by the listener) until `register` sees the room.
    """

    def __init__(self, identity: str) -> None:
        self.identity = identity  # the prefill's own host:port, told to decodes
        self._pending: dict[int, _Slot] = {}
        self._waiters: dict[int, tuple[asyncio.Future[str], str]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def register(self, room: int) -> asyncio.Future[str]:
        """A prefill request with `room` arrived; the future yields the decode's identity."""
        if room in self._pending:
            raise DuplicateRoom(room)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        slot = _Slot(future)
        self._pending[room] = slot
        waiter = self._waiters.pop(room, None)
        if waiter is not None and not waiter[0].done():
            waiter[0].set_result(self.identity)
            slot.joined = True
            future.set_result(waiter[1])
        return future

    def release(self, room: int, future: asyncio.Future[str]) -> None:
        """The prefill request with `room` finished (or failed, or was abandoned)."""
        slot = self._pending.get(room)
        if slot is not None and slot.future is future:
            del self._pending[room]

    def join(self, room: int, peer: str) -> str | asyncio.Future[str]:
        """A decode `peer` asks for `room`: the prefill identity now, or a future of it."""
        slot = self._pending.get(room)
        if slot is not None:
            if slot.joined:
                raise DuplicateRoom(room)
            slot.joined = True
            if not slot.future.done():
                slot.future.set_result(peer)
            return self.identity
        if room in self._waiters:
            raise DuplicateRoom(room)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[room] = (future, peer)
        return future

    def unwait(self, room: int, future: asyncio.Future[str]) -> None:
        """A waiting decode gave up (timeout or its connection closed)."""
        waiter = self._waiters.get(room)
        if waiter is not None and waiter[0] is future:
            del self._waiters[room]
        if not future.done():
            future.cancel()
