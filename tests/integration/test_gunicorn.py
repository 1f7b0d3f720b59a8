"""minilb under Gunicorn with several workers: one global round-robin order."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.balancer import Balancer, make_config, start_balancer
from tests.integration.conftest import split
from tests.procs import SimProc

pytestmark = pytest.mark.gunicorn


SIMS = (2, 3)


def counts(sims: list[SimProc]) -> list[int]:
    return [s.stats()["requests"].get("/generate", 0) for s in sims]


async def load(url: str, total: int, concurrency: int, *, stream: bool = False,
               keepalive: bool = True) -> Counter[str]:
    """Send `total` /generate requests, `concurrency` at a time; count outcomes."""
    outcomes: Counter[str] = Counter()
    queue = iter(range(total))
    limits = httpx.Limits(max_keepalive_connections=concurrency if keepalive else 0)
    body = {"text": "a b", "sampling_params": {"max_new_tokens": 4}, "stream": stream}

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in queue:
            try:
                r = await client.post(f"{url}/generate", json=body)
                ok = r.status_code == 200 and (not stream or r.text.endswith("data: [DONE]\n\n"))
                ok = ok and "error" not in (r.text if stream else json.dumps(r.json()))
                outcomes["ok" if ok else f"status {r.status_code}"] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return outcomes


@pytest.fixture
def lb(sims: list[SimProc], request: pytest.FixtureRequest) -> Iterator[Balancer]:
    for sim in sims:
        sim.reset()
    prefills, decodes = split(sims)
    mode = getattr(request, "param", "gunicorn")
    balancer = start_balancer(make_config(prefills, decodes), mode=mode, workers=4)
    yield balancer
    balancer.stop()


@pytest.mark.parametrize("lb", ["gunicorn", "serve"], indirect=True)
def test_four_workers_share_one_exact_round_robin(lb: Balancer, sims: list[SimProc]) -> None:
    assert len(lb.workers()) == 4
    outcomes = asyncio.run(load(lb.url, 1200, 64))
    assert outcomes == {"ok": 1200}
    prefills, decodes = split(sims)
    assert counts(prefills) == [600, 600]
    assert counts(decodes) == [400, 400, 400]
    assert sum(s.stats()["rooms_paired"] for s in decodes) == 1200
    assert sum(s.stats()["rooms_timed_out"] for s in sims) == 0


def test_workers_killed_under_load_never_block_the_others(lb: Balancer, sims: list[SimProc]) -> None:
    stop = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        while len(killed) < 6 and not stop.wait(0.3):
            workers = lb.workers()
            if workers:
                victim = workers[len(killed) % len(workers)]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        outcomes = asyncio.run(load(lb.url, 1500, 32))
    finally:
        stop.set()
        thread.join()
    assert len(killed) >= 3
    # Only requests in flight on a killed worker (or sent on its connections) may fail.
    assert outcomes["ok"] >= 1500 - len(killed) * 32, outcomes
    # Service goes on: Gunicorn replaced the workers and every one of them answers.
    time.sleep(1.0)
    after = asyncio.run(load(lb.url, 300, 16))
    assert after == {"ok": 300}
    prefills, decodes = split(sims)
    # Requests that reached the servers keep the global order: shares stay within one.
    for group in (prefills, decodes):
        seen = counts(group)
        assert max(seen) - min(seen) <= 1, seen


def test_sighup_during_streaming_load_fails_no_request(lb: Balancer, sims: list[SimProc]) -> None:
    for sim in sims:
        sim.set_knobs(itl=0.01)
    before = set(lb.workers())

    def reload() -> None:
        time.sleep(1.0)
        os.kill(lb.popen.pid, signal.SIGHUP)

    thread = threading.Thread(target=reload)
    thread.start()
    try:
        # New connections per request: a keep-alive connection to a retiring worker
        # may be closed between two requests, which clients retry; streams may not fail.
        outcomes = asyncio.run(load(lb.url, 400, 16, stream=True, keepalive=False))
    finally:
        thread.join()
        for sim in sims:
            sim.set_knobs(itl=0.0)
    assert outcomes == {"ok": 400}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(lb.workers()) & before:
        time.sleep(0.1)
    assert not set(lb.workers()) & before, "old workers should have been replaced"
