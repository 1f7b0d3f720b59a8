"""One generation request on a simulator: faults, pairing, timing and output."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from minilb.sim import formats
from minilb.sim.bootstrap import BootstrapClient, PairTimeout
from minilb.sim.formats import DONE, encode, sse
from minilb.sim.knobs import Knobs, SimConfig
from minilb.sim.pairing import DuplicateRoom, RoomRegistry
from minilb.sim.requests import GenRequest
from minilb.sim.stats import Stats
from minilb.sim.types import Send

# SGLang's sentinel host: health checks and warm-up requests skip the KV transfer.
FAKE_BOOTSTRAP_HOST = "2.2.2.2"

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class SimulatedReset(Exception):
    """Raised mid-stream so uvicorn drops the connection (the reset fault)."""


class GenFailure(Exception):
    """The request fails with `status` and `message` (before or during its stream)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Exchange:
    """The state of one generation request shared with its disconnect watcher."""

    send: Send
    stats: Stats
    started: bool = False
    finished: bool = False
    disconnected: bool = False
    aborted: bool = False
    events: int = 0
    reset_after: int = 0
    rooms: list[int] = field(default_factory=list)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, last: bool = False) -> None:
        if last:
            # uvicorn's receive() reports http.disconnect once the response is
            # complete; mark it finished first so that is not taken for a client leaving.
            self.finished = True
        self.stats.bytes_sent += len(data)
        await self.send({"type": "http.response.body", "body": data, "more_body": not last})

    async def event(self, data: bytes) -> None:
        if self.reset_after and self.events >= self.reset_after:
            self.stats.resets_injected += 1
            raise SimulatedReset
        self.events += 1
        self.stats.events_sent += 1
        await self.body(data)

    async def done(self) -> None:
        if self.reset_after and self.events >= self.reset_after:
            self.stats.resets_injected += 1
            raise SimulatedReset
        self.events += 1
        self.stats.events_sent += 1
        await self.body(DONE, last=True)

    async def complete(self, status: int, body: bytes) -> None:
        await self.start(status, [*JSON_HEADERS, (b"content-length", b"%d" % len(body))])
        await self.body(body, last=True)


class Generator:
    """Runs generation requests for one simulator (either role)."""

    def __init__(
        self,
        config: SimConfig,
        stats: Stats,
        knobs: Knobs,
        *,
        registry: RoomRegistry | None,
        client: BootstrapClient | None,
        rng: random.Random,
    ) -> None:
        self.config = config
        self.stats = stats
        self.knobs = knobs
        self.registry = registry
        self.client = client
        self.rng = rng
        self.prefill = config.role == "prefill"
        self.decode_rooms: set[int] = set()

    def delay(self, seconds: float) -> float:
        jitter = self.knobs.jitter
        if jitter and seconds:
            seconds *= 1.0 + self.rng.uniform(-jitter, jitter)
        return seconds

    def injected_failure(self) -> GenFailure | None:
        knobs = self.knobs
        if knobs.fail_next > 0:
            knobs.fail_next -= 1
        elif not (knobs.fail_probability and self.rng.random() < knobs.fail_probability):
            return None
        self.stats.failures_injected += 1
        status = knobs.fail_status
        return GenFailure(status, f"simulated failure (status {status})")

    def claim_rooms(self, req: GenRequest, ex: Exchange) -> list[asyncio.Future[str] | None]:
        """Mark the request's rooms in flight; raises DuplicateRoom (nothing claimed then)."""
        futures: list[asyncio.Future[str] | None] = []
        claimed: list[int] = []
        try:
            for item in req.items:
                room = item.room
                assert room is not None  # checked by the app before
                if item.host == FAKE_BOOTSTRAP_HOST:
                    futures.append(None)
                    continue
                if self.registry is not None:
                    futures.append(self.registry.register(room))
                else:
                    if room in self.decode_rooms:
                        raise DuplicateRoom(room)
                    self.decode_rooms.add(room)
                    futures.append(None)
                claimed.append(room)
        except DuplicateRoom:
            self.stats.rooms_duplicated += 1
            ex.rooms = claimed
            self.release(ex, futures)
            raise
        ex.rooms = claimed
        return futures

    def release(self, ex: Exchange, futures: list[asyncio.Future[str] | None]) -> None:
        if self.registry is not None:
            for room, future in zip(ex.rooms, (f for f in futures if f is not None), strict=False):
                self.registry.release(room, future)
        else:
            self.decode_rooms.difference_update(ex.rooms)
        ex.rooms = []

    async def pair(
        self, req: GenRequest, futures: list[asyncio.Future[str] | None], arrival: float
    ) -> None:
        """Wait until every item met its partner; raises GenFailure otherwise."""
        timeout = self.knobs.pair_timeout
        deadline = arrival + timeout
        items = [
            (item, f)
            for item, f in zip(req.items, futures, strict=True)
            if item.host != FAKE_BOOTSTRAP_HOST
        ]
        if not items:
            return
        if self.registry is not None:
            for item, future in items:
                assert future is not None
                try:
                    peer = await asyncio.wait_for(future, deadline - time.monotonic())
                except TimeoutError:
                    self.stats.rooms_timed_out += sum(
                        1 for _, f in items if not f or not f.done() or f.cancelled()
                    )
                    room = item.room or 0
                    raise GenFailure(
                        500, formats.prefill_timeout_message(room, time.monotonic() - arrival)
                    ) from None
                self.stats.pair(item.room or 0, item.host, item.port, peer)
            return
        results = (
            await asyncio.gather(
                *(
                    self._decode_pair(item.room or 0, item.host, item.port, deadline)
                    for item, _ in items
                ),
                return_exceptions=True,
            )
            if len(items) > 1
            else [
                await self._decode_pair_safe(
                    items[0][0].room or 0, items[0][0].host, items[0][0].port, deadline
                )
            ]
        )
        failure: BaseException | None = None
        for (item, _), result in zip(items, results, strict=True):
            if isinstance(result, str):
                self.stats.pair(item.room or 0, item.host, item.port, result)
            elif isinstance(result, PairTimeout):
                self.stats.rooms_timed_out += 1
                failure = failure or result
            elif isinstance(result, DuplicateRoom):
                self.stats.rooms_duplicated += 1
                failure = result
            elif isinstance(result, BaseException):
                raise result
        if isinstance(failure, DuplicateRoom):
            raise GenFailure(400, formats.duplicate_room_message(failure.room))
        if isinstance(failure, PairTimeout):
            room = failure.args[0]
            raise GenFailure(500, formats.decode_timeout_message(room, time.monotonic() - arrival))

    async def _decode_pair_safe(
        self, room: int, host: str | None, port: int | None, deadline: float
    ) -> str | BaseException:
        try:
            return await self._decode_pair(room, host, port, deadline)
        except (PairTimeout, DuplicateRoom) as exc:
            return exc

    async def _decode_pair(
        self, room: int, host: str | None, port: int | None, deadline: float
    ) -> str:
        assert self.client is not None and host is not None
        if self.knobs.skip_bootstrap:
            # "Decode never joins": wait out the timeout without contacting the prefill.
            await asyncio.sleep(max(deadline - time.monotonic(), 0))
            raise PairTimeout(room)
        return await self.client.pair(host, port or self.config.bootstrap_port, room, deadline)

    async def run(self, req: GenRequest, ex: Exchange, arrival: float) -> None:
        """Answer one generation request (whose rooms and hosts were checked)."""
        knobs = self.knobs
        ex.reset_after = knobs.reset_after_events
        headers_at = arrival + knobs.slow_headers
        failure = self.injected_failure()
        if failure is not None:
            await _sleep_until(headers_at)
            await ex.complete(
                failure.status, formats.error_body(req.kind, failure.message, failure.status)
            )
            return
        if knobs.hang:
            await asyncio.Event().wait()  # until the client goes away (cancelled)
        try:
            futures = self.claim_rooms(req, ex)
        except DuplicateRoom as exc:
            await _sleep_until(headers_at)
            await ex.complete(
                400, formats.error_body(req.kind, formats.duplicate_room_message(exc.room), 400)
            )
            return
        try:
            try:
                if knobs.slow_headers:
                    pairing = asyncio.ensure_future(self.pair(req, futures, arrival))
                    try:
                        await _sleep_until(headers_at)
                        if req.stream:
                            await ex.start(200, SSE_HEADERS)
                        await pairing
                    finally:
                        pairing.cancel()
                else:
                    if req.stream:
                        await ex.start(200, SSE_HEADERS)
                    await self.pair(req, futures, arrival)
            except GenFailure as exc:
                if ex.started:
                    # SGLang has sent 200 and its headers already: the error is an event.
                    await ex.event(formats.stream_error_event(exc.message, exc.status))
                    await ex.done()
                else:
                    await ex.complete(
                        exc.status, formats.error_body(req.kind, exc.message, exc.status)
                    )
                return
            if req.stream:
                await self._stream(req, ex, arrival)
            else:
                await self._whole(req, ex, arrival)
        finally:
            # Rooms stay in flight (duplicates detected) until the response ends.
            self.release(ex, futures)

    def _lengths(self, req: GenRequest) -> list[int]:
        if self.prefill:
            return [min(1, item.max_new_tokens) for item in req.items]
        return [item.max_new_tokens for item in req.items]

    def _first_delay(self, req: GenRequest) -> float:
        prompt = sum(item.prompt_tokens for item in req.items)
        return self.delay(self.knobs.prefill_delay_per_token * prompt + self.knobs.ttft)

    async def _whole(self, req: GenRequest, ex: Exchange, arrival: float) -> None:
        lengths = self._lengths(req)
        longest = max(lengths)
        wait = self._first_delay(req) if longest else 0.0
        if longest > 1 and self.knobs.itl:
            wait += sum(self.delay(self.knobs.itl) for _ in range(longest - 1))
        if wait:
            await asyncio.sleep(wait)
        self.stats.tokens_generated += sum(lengths)
        latency = time.monotonic() - arrival
        if req.kind == "generate":
            results = [
                formats.generate_result(
                    item,
                    n,
                    finished=True,
                    prefill=self.prefill,
                    logprob=req.return_logprob,
                    latency=latency,
                )
                for item, n in zip(req.items, lengths, strict=True)
            ]
            body = encode(results if req.batch else results[0])
        else:
            body = encode(
                formats.openai_result(
                    req, req.model or self.config.model, lengths[0], int(time.time())
                )
            )
        await ex.complete(200, body)

    async def _stream(self, req: GenRequest, ex: Exchange, arrival: float) -> None:
        lengths = self._lengths(req)
        if req.kind == "generate":
            await self._stream_generate(req, ex, arrival, lengths)
        else:
            await self._stream_openai(req, ex, lengths[0])
        await ex.done()

    async def _token_wait(self, req: GenRequest, step: int) -> None:
        wait = self._first_delay(req) if step == 0 else self.delay(self.knobs.itl)
        if wait:
            await asyncio.sleep(wait)

    async def _stream_generate(
        self, req: GenRequest, ex: Exchange, arrival: float, lengths: list[int]
    ) -> None:
        texts = [""] * len(lengths)
        index = list(range(len(lengths))) if req.batch else [None]
        longest = max(lengths)
        for step in range(max(longest, 1)):
            if longest:
                await self._token_wait(req, step)
            latency = time.monotonic() - arrival
            for i, (item, n) in enumerate(zip(req.items, lengths, strict=True)):
                if step >= n and not (n == 0 and step == 0):
                    continue
                if n:
                    token = formats.token_text(step)
                    texts[i] = f"{texts[i]} {token}" if step else token
                    self.stats.tokens_generated += 1
                done = step + 1 >= n
                await ex.event(
                    sse(
                        formats.generate_result(
                            item,
                            min(step + 1, n),
                            finished=done,
                            prefill=self.prefill,
                            logprob=req.return_logprob,
                            latency=latency,
                            text=texts[i],
                            index=index[i] if req.batch else None,
                        )
                    )
                )

    async def _stream_openai(self, req: GenRequest, ex: Exchange, n: int) -> None:
        model = req.model or self.config.model
        created = int(time.time())
        chunk = formats.openai_chunk
        if self.prefill:
            # The prefill answers its one token in one chunk.
            if n:
                await self._token_wait(req, 0)
            self.stats.tokens_generated += n
            await ex.event(
                sse(
                    chunk(
                        req,
                        model,
                        created,
                        content=formats.output_text(n),
                        role=True,
                        finish_reason="length",
                    )
                )
            )
        else:
            if req.kind == "chat":
                await ex.event(sse(chunk(req, model, created, content="", role=True)))
            for step in range(n):
                await self._token_wait(req, step)
                token = formats.token_text(step)
                self.stats.tokens_generated += 1
                await ex.event(
                    sse(chunk(req, model, created, content=f" {token}" if step else token))
                )
            await ex.event(
                sse(
                    chunk(
                        req,
                        model,
                        created,
                        content=None if req.kind == "chat" else "",
                        finish_reason="length",
                    )
                )
            )
        if req.include_usage:
            await ex.event(sse(formats.openai_usage_chunk(req, model, created, n)))


async def _sleep_until(when: float) -> None:
    wait = when - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)
