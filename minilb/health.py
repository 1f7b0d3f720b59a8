"""Health checks: pure state transitions, and one prober for the whole deployment.

Every worker runs `Prober.run`, but only the worker holding the prober lock
(an `fcntl` lock, which the kernel releases when its holder dies) probes; the
others wait to take over. Results go to the shared server table, so every
worker sees a server leave or rejoin the rotation at the same moment.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import httpx

from minilb.membership import Membership
from minilb.servers import Server
from minilb.shared import PROBER_LOCK

logger = logging.getLogger("minilb.health")


@dataclass
class HealthTracker:
    """Turns consecutive probe results into healthy/unhealthy, with thresholds."""

    failure_threshold: int
    success_threshold: int
    _failures: dict[str, int] = field(default_factory=dict)
    _successes: dict[str, int] = field(default_factory=dict)

    def observe(self, url: str, ok: bool, healthy: bool) -> bool:
        """The server's health after this probe result, given its health before it."""
        if ok:
            self._failures[url] = 0
            self._successes[url] = self._successes.get(url, 0) + 1
            return healthy or self._successes[url] >= self.success_threshold
        self._successes[url] = 0
        self._failures[url] = self._failures.get(url, 0) + 1
        return healthy and self._failures[url] < self.failure_threshold

    def forget(self, keep: set[str]) -> None:
        for counts in (self._failures, self._successes):
            for url in set(counts) - keep:
                del counts[url]


class Prober:
    def __init__(
        self,
        membership: Membership,
        client: httpx.AsyncClient,
        *,
        interval: float,
        timeout: float,
        tracker: HealthTracker,
    ) -> None:
        self.membership = membership
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self.tracker = tracker
        self.leader = False

    async def _probe(self, server: Server) -> bool:
        """Healthy unless the server cannot be reached, times out or answers 5xx.

        SGLang answers /health with 200, or 503 when it is unwell; a 4xx means a
        server that is up but has no such route, which is no reason to drop it.
        """
        try:
            response = await self.client.get(f"{server.url}/health", timeout=self.timeout)
        except httpx.HTTPError:
            return False
        return response.status_code < 500

    async def probe_once(self) -> None:
        servers = self.membership.servers().all()
        results = await asyncio.gather(*(self._probe(s) for s in servers))
        health = {}
        for server, ok in zip(servers, results, strict=True):
            healthy = self.tracker.observe(server.url, ok, server.healthy)
            if healthy != server.healthy:
                logger.warning(
                    "%s server %s is now %s", server.role, server.url, "healthy" if healthy else "UNHEALTHY"
                )
            health[server.url] = healthy
        self.tracker.forget(set(health))
        self.membership.set_health(health)

    async def run(self) -> None:
        shared = self.membership.shared
        try:
            while True:
                if not self.leader and shared.try_lock(PROBER_LOCK):
                    self.leader = True
                if self.leader:
                    try:
                        await self.probe_once()
                    except Exception:  # a prober that dies silently would freeze health
                        logger.exception("health probe failed")
                await asyncio.sleep(self.interval)
        finally:
            if self.leader:
                shared.unlock(PROBER_LOCK)
                self.leader = False
