"""Counters a simulator keeps for tests; `GET /_sim/stats` returns them."""

from __future__ import annotations

from collections import deque
from typing import Any

RECENT_PAIRS = 1000
RECENT_REQUESTS = 200


class Stats:
    """Plain counters, mutated from one event loop (no locking needed)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.reset()

    def reset(self) -> None:
        self.requests: dict[str, int] = {}
        self.generate_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.rooms_paired = 0
        self.rooms_timed_out = 0
        self.rooms_duplicated = 0
        self.bytes_sent = 0
        self.events_sent = 0
        self.connections_opened = 0
        self.client_disconnects = 0
        self.failures_injected = 0
        self.resets_injected = 0
        self.aborted = 0
        self.tokens_generated = 0
        self.recent_pairs: deque[dict[str, Any]] = deque(maxlen=RECENT_PAIRS)
        self.recent_requests: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)

    def request(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.requests[path] = self.requests.get(path, 0) + 1
        self.recent_requests.append(
            {
                "path": path,
                "headers": {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers},
                "body": body.decode("utf-8", errors="replace"),
            }
        )

    def enter(self) -> None:
        self.generate_requests += 1
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def leave(self) -> None:
        self.in_flight -= 1

    def pair(self, room: int, host: str | None, port: int | None, peer: str) -> None:
        self.rooms_paired += 1
        self.recent_pairs.append(
            {"room": room, "bootstrap_host": host, "bootstrap_port": port, "peer": peer}
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "requests": self.requests,
            "generate_requests": self.generate_requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "rooms_paired": self.rooms_paired,
            "rooms_timed_out": self.rooms_timed_out,
            "rooms_duplicated": self.rooms_duplicated,
            "bytes_sent": self.bytes_sent,
            "events_sent": self.events_sent,
            "connections_opened": self.connections_opened,
            "client_disconnects": self.client_disconnects,
            "failures_injected": self.failures_injected,
            "resets_injected": self.resets_injected,
            "aborted": self.aborted,
            "tokens_generated": self.tokens_generated,
            "recent_pairs": list(self.recent_pairs),
            "recent_requests": list(self.recent_requests),
        }
