"""The prefill's room registry (minilb.sim.pairing): futures only, no sockets."""

from __future__ import annotations

import asyncio

import pytest

from minilb.sim.pairing import DuplicateRoom, RoomRegistry


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_prefill_first_then_decode_joins() -> None:
    async def main() -> None:
        reg = RoomRegistry("P")
        fut = reg.register(1)
        assert reg.join(1, "D") == "P"
        assert await fut == "D"
        reg.release(1, fut)
        assert len(reg) == 0

    run(main())


def test_decode_first_waits_for_prefill() -> None:
    async def main() -> None:
        reg = RoomRegistry("P")
        waiting = reg.join(2, "D")
        assert isinstance(waiting, asyncio.Future)
        fut = reg.register(2)
        assert await waiting == "P" and await fut == "D"

    run(main())


def test_duplicates() -> None:
    async def main() -> None:
        reg = RoomRegistry("P")
        fut = reg.register(3)
        with pytest.raises(DuplicateRoom):
            reg.register(3)
        reg.join(3, "D1")
        with pytest.raises(DuplicateRoom):
            reg.join(3, "D2")
        waiting = reg.join(4, "D1")
        with pytest.raises(DuplicateRoom):
            reg.join(4, "D2")
        assert isinstance(waiting, asyncio.Future)
        reg.unwait(4, waiting)
        reg.release(3, fut)
        reg.register(3)  # released: the room may be used again

    run(main())


def test_gave_up_decode_is_not_joined() -> None:
    async def main() -> None:
        reg = RoomRegistry("P")
        waiting = reg.join(5, "D")
        assert isinstance(waiting, asyncio.Future)
        reg.unwait(5, waiting)
        fut = reg.register(5)
        assert not fut.done()  # still waiting for a live decode

    run(main())
