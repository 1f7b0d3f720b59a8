"""Prometheus metrics, whole across Gunicorn workers.

Each worker counts in its own region of a shared mapping (made before fork,
like the rest of the shared state), with plain increments: a region has one
writer, so no atomics are needed, and a replacement worker takes over its
predecessor's region, so counters never go backwards. A scrape, answered by
whichever worker gets it, sums every region.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left
from collections.abc import Iterable

from minilb.membership import Membership
from minilb.servers import Server
from minilb.shared import IN_FLIGHT, MAX_SERVERS, MAX_WORKERS, SharedState

ROUTES = (
    "/generate", "/v1/chat/completions", "/v1/completions", "/health", "/readiness",
    "/health_generate", "/flush_cache", "/get_server_info", "/server_info", "/get_model_info",
    "/model_info", "/v1/models", "/register", "/workers", "/metrics", "other",
)
ROUTE_INDEX = {route: i for i, route in enumerate(ROUTES)}
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_HIST = len(BOUNDS) + 2  # buckets, +Inf, sum in microseconds
_CODES = 500  # status 100..599

# Offsets, in 8-byte slots, inside one worker's region.
_USED = 0
_RETRIES = 1
_REJECTED = 2
_REQUESTS = 8
_DURATION = _REQUESTS + len(ROUTES) * _CODES
_FIRST_BYTE = _DURATION + len(ROUTES) * _HIST
_SERVER = _FIRST_BYTE + len(ROUTES) * _HIST
_S_SELECTED, _S_REQUESTS, _S_ERRORS, _S_LATENCY = 0, 1, 2, 3
_SERVER_SLOTS = 3 + _HIST
REGION = _SERVER + MAX_SERVERS * _SERVER_SLOTS


def new_buffer() -> mmap.mmap:
    """The shared mapping for every worker's region; make it before fork."""
    return mmap.mmap(-1, MAX_WORKERS * REGION * 8)


class Metrics:
    """One worker's counters."""

    def __init__(self, buffer: mmap.mmap, slot: int) -> None:
        self._v = memoryview(buffer).cast("q")[slot * REGION : (slot + 1) * REGION]
        self._v[_USED] = 1

    def _observe(self, base: int, seconds: float) -> None:
        v = self._v
        v[base + bisect_left(BOUNDS, seconds)] += 1
        v[base + _HIST - 1] += int(seconds * 1e6)

    def request(self, route: int, status: int, seconds: float) -> None:
        if 100 <= status < 600:
            self._v[_REQUESTS + route * _CODES + status - 100] += 1
        self._observe(_DURATION + route * _HIST, seconds)

    def first_byte(self, route: int, seconds: float) -> None:
        self._observe(_FIRST_BYTE + route * _HIST, seconds)

    def selected(self, server: Server) -> None:
        self._v[_SERVER + server.id * _SERVER_SLOTS + _S_SELECTED] += 1

    def upstream(self, server: Server, seconds: float, failed: bool) -> None:
        base = _SERVER + server.id * _SERVER_SLOTS
        v = self._v
        v[base + _S_REQUESTS] += 1
        if failed:
            v[base + _S_ERRORS] += 1
        self._observe(base + _S_LATENCY, seconds)

    def retry(self) -> None:
        self._v[_RETRIES] += 1

    def rejected(self) -> None:
        self._v[_REJECTED] += 1


class _Totals:
    """Every worker's regions added up."""

    def __init__(self, buffer: mmap.mmap) -> None:
        view = memoryview(buffer).cast("q")
        self._regions = [
            view[i * REGION : (i + 1) * REGION] for i in range(MAX_WORKERS) if view[i * REGION + _USED]
        ]

    def at(self, offset: int) -> int:
        return sum(region[offset] for region in self._regions)

    def span(self, offset: int, length: int) -> list[int]:
        totals = [0] * length
        for region in self._regions:
            for i, value in enumerate(region[offset : offset + length]):
                totals[i] += value
        return totals


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _histogram(name: str, values: list[int], labels: dict[str, str]) -> Iterable[str]:
    cumulative = 0
    for bound, count in zip((*BOUNDS, float("inf")), values[:-1], strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        yield f"{name}_bucket{_labels(**labels, le=le)} {cumulative}"
    yield f"{name}_sum{_labels(**labels)} {values[-1] / 1e6}"
    yield f"{name}_count{_labels(**labels)} {cumulative}"


def render(buffer: mmap.mmap, shared: SharedState, membership: Membership) -> bytes:
    """The Prometheus text exposition of all workers' metrics."""
    totals = _Totals(buffer)
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("minilb_requests_total", "counter", "Requests answered, by route and HTTP status.")
    for r, route in enumerate(ROUTES):
        for i, count in enumerate(totals.span(_REQUESTS + r * _CODES, _CODES)):
            if count:
                out.append(f"minilb_requests_total{_labels(route=route, code=str(i + 100))} {count}")
    for name, base, help_text in (
        ("minilb_request_duration_seconds", _DURATION, "Time from request to the end of the answer."),
        ("minilb_time_to_first_byte_seconds", _FIRST_BYTE, "Time to the first body byte of a stream."),
    ):
        family(name, "histogram", help_text)
        for r, route in enumerate(ROUTES):
            values = totals.span(base + r * _HIST, _HIST)
            if any(values):
                out.extend(_histogram(name, values, {"route": route}))
    family("minilb_in_flight_requests", "gauge", "Generation requests in flight, all workers.")
    out.append(f"minilb_in_flight_requests {shared.signed(IN_FLIGHT)}")
    family("minilb_retries_total", "counter", "Attempts retried on another pair.")
    out.append(f"minilb_retries_total {totals.at(_RETRIES)}")
    family("minilb_admission_rejections_total", "counter", "Requests refused with 429 at the cap.")
    out.append(f"minilb_admission_rejections_total {totals.at(_REJECTED)}")

    servers = membership.servers().all()
    per_server = [(s, totals.span(_SERVER + s.id * _SERVER_SLOTS, _SERVER_SLOTS)) for s in servers]
    for name, kind, index, help_text in (
        ("minilb_pair_selections_total", "counter", _S_SELECTED, "Times a server was picked for a pair."),
        ("minilb_upstream_requests_total", "counter", _S_REQUESTS, "Generation requests sent to a server."),
        ("minilb_upstream_errors_total", "counter", _S_ERRORS,
         "Requests a server failed: no connection, closed, or a 5xx."),
    ):
        family(name, kind, help_text)
        for server, values in per_server:
            out.append(f"{name}{_labels(server=server.url, role=server.role)} {values[index]}")
    family("minilb_upstream_response_seconds", "histogram", "Time until a server's response head.")
    for server, values in per_server:
        out.extend(_histogram("minilb_upstream_response_seconds", values[_S_LATENCY:],
                              {"server": server.url, "role": server.role}))
    family("minilb_upstream_in_flight_requests", "gauge", "Requests in flight to a server.")
    for server, _ in per_server:
        labels = _labels(server=server.url, role=server.role)
        out.append(f"minilb_upstream_in_flight_requests{labels} {membership.in_flight(server.id)}")
    family("minilb_server_healthy", "gauge", "1 when a server passes its health checks.")
    for server, _ in per_server:
        labels = _labels(server=server.url, role=server.role)
        out.append(f"minilb_server_healthy{labels} {int(server.healthy)}")
    return ("\n".join(out) + "\n").encode()
