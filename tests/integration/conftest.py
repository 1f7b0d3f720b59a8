from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.balancer import Balancer, make_config, start_balancer
from tests.procs import SimProc, start_sim

KNOBS_OFF = {
    "fail_next": 0,
    "fail_probability": 0.0,
    "hang": False,
    "slow_headers": 0.0,
    "health_fail": False,
    "reset_after_events": 0,
    "itl": 0.0,
    "ttft": 0.0,
}


@dataclass
class PD:
    """Simulated servers and a balancer in front of them."""

    prefills: list[SimProc]
    decodes: list[SimProc]
    lb: Balancer

    @property
    def url(self) -> str:
        return self.lb.url

    @property
    def sims(self) -> list[SimProc]:
        return self.prefills + self.decodes

    def reset(self) -> None:
        for sim in self.sims:
            sim.set_knobs(**KNOBS_OFF)
            sim.reset()


def start_sims(n_prefill: int, n_decode: int, pair_timeout: float = 5.0) -> list[SimProc]:
    sims: list[SimProc] = []
    try:
        for _ in range(n_prefill):
            sims.append(start_sim("prefill", pair_timeout=pair_timeout))
        for _ in range(n_decode):
            sims.append(start_sim("decode", pair_timeout=pair_timeout))
    except BaseException:
        for sim in sims:
            sim.stop()
        raise
    return sims


@pytest.fixture(scope="module")
def sims(request: pytest.FixtureRequest) -> Iterator[list[SimProc]]:
    """Simulators for a whole module; it sets `SIMS = (prefills, decodes)` (default 1, 1)."""
    n_prefill, n_decode = getattr(request.module, "SIMS", (1, 1))
    procs = start_sims(n_prefill, n_decode)
    yield procs
    for sim in procs:
        sim.stop()


@pytest.fixture
def clean_sims(sims: list[SimProc]) -> None:
    """Knobs off and counters at zero before a test."""
    for sim in sims:
        sim.set_knobs(**KNOBS_OFF)
        sim.reset()


def split(sims: list[SimProc]) -> tuple[list[SimProc], list[SimProc]]:
    return [s for s in sims if s.role == "prefill"], [s for s in sims if s.role == "decode"]


@pytest.fixture(scope="module")
def pd() -> Iterator[PD]:
    """One prefill, one decode and minilb under uvicorn, for the whole module."""
    sims = start_sims(1, 1)
    lb = None
    try:
        lb = start_balancer(make_config(sims[:1], sims[1:], max_body_bytes=1 << 20, max_attempts=1))
        yield PD(sims[:1], sims[1:], lb)
    finally:
        if lb is not None:
            lb.stop()
        for sim in sims:
            sim.stop()


def wait_until(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll `check` until it holds; a bounded wait for state that settles asynchronously."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()
