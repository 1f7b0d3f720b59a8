"""Metrics summed over Gunicorn workers, request IDs end to end, the access log, `minilb status`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from minilb.status import parse_metrics
from tests.balancer import Balancer, make_config, start_balancer
from tests.integration.conftest import split
from tests.procs import SimProc

SIMS = (2, 2)
pytestmark = pytest.mark.usefixtures("clean_sims")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample; 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def burst(url: str, n: int, concurrency: int, body: dict[str, object]) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with sem:
                return (await client.post(f"{url}/generate", json=body)).status_code

        return await asyncio.gather(*(one() for _ in range(n)))


def test_metrics_are_whole_across_four_workers(sims: list[SimProc]) -> None:
    prefills, decodes = split(sims)
    lb = start_balancer(make_config(prefills, decodes), mode="gunicorn", workers=4)
    try:
        statuses = asyncio.run(burst(lb.url, 400, 32, {"text": "a b", "stream": False}))
        assert statuses == [200] * 400
        streamed = asyncio.run(burst(lb.url, 40, 8, {"text": "a", "stream": True}))
        assert streamed == [200] * 40
        for _ in range(10):
            assert httpx.post(f"{lb.url}/generate", content=b"{bad").status_code == 400
        # Whichever worker answers the scrape, it reports every worker's counts.
        for _ in range(8):
            text = httpx.get(f"{lb.url}/metrics").text
            assert sample(text, "minilb_requests_total", route="/generate", code="200") == 440
            assert sample(text, "minilb_requests_total", route="/generate", code="400") == 10
            assert sample(text, "minilb_request_duration_seconds_count", route="/generate") == 450
            assert sample(text, "minilb_time_to_first_byte_seconds_count", route="/generate") == 40
            for group in (prefills, decodes):
                picks = [sample(text, "minilb_pair_selections_total", server=s.url, role=s.role)
                         for s in group]
                assert picks == [220, 220]
                sent = [sample(text, "minilb_upstream_requests_total", server=s.url, role=s.role)
                        for s in group]
                assert sent == [s.stats()["generate_requests"] for s in group]
            assert sample(text, "minilb_in_flight_requests") == 0
            assert sample(text, "minilb_server_healthy", server=decodes[0].url, role="decode") == 1
        assert "# TYPE minilb_request_duration_seconds histogram" in text
    finally:
        lb.stop()


def test_errors_and_retries_are_counted(sims: list[SimProc]) -> None:
    prefills, decodes = split(sims)
    lb = start_balancer(make_config(prefills, decodes))
    try:
        for d in decodes:  # the first request fails on both, then succeeds on its third attempt
            d.set_knobs(fail_next=1, fail_status=503)
        for _ in range(4):
            assert httpx.post(f"{lb.url}/generate", json={"text": "x"}, timeout=10).status_code == 200
        text = httpx.get(f"{lb.url}/metrics").text
        errors = [sample(text, "minilb_upstream_errors_total", server=d.url, role="decode") for d in decodes]
        assert errors == [1, 1]
        assert sample(text, "minilb_retries_total") == 2
        assert sample(text, "minilb_requests_total", route="/generate", code="200") == 4
    finally:
        lb.stop()


def test_request_id_reaches_both_servers_and_comes_back(sims: list[SimProc]) -> None:
    prefills, decodes = split(sims)
    lb = start_balancer(make_config(prefills[:1], decodes[:1], max_attempts=1))
    try:
        r = httpx.post(f"{lb.url}/generate", json={"text": "x"}, headers={"x-request-id": "trace-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        for sim in (prefills[0], decodes[0]):
            seen = sim.last_request()["headers"]
            assert seen["x-request-id"] == "trace-42", sim.role
        # Without one, minilb makes one up, and it is the same everywhere.
        r = httpx.post(f"{lb.url}/generate", json={"text": "x"})
        made = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        assert decodes[0].last_request()["headers"]["x-request-id"] == made
        # Errors carry it in the body too.
        decodes[0].set_knobs(fail_next=1, fail_status=500)
        r = httpx.post(f"{lb.url}/generate", json={"text": "x"}, headers={"x-correlation-id": "c-7"})
        assert r.status_code == 502 and r.json()["error"]["request_id"] == "c-7"
        r = httpx.post(f"{lb.url}/generate", content=b"[]", headers={"x-request-id": "bad-1"})
        assert r.json()["error"]["request_id"] == "bad-1" and r.headers["x-request-id"] == "bad-1"
    finally:
        lb.stop()


def test_json_access_log_has_one_line_per_request(sims: list[SimProc]) -> None:
    prefills, decodes = split(sims)
    lb = start_balancer(make_config(prefills[:1], decodes[:1], access_log="json"))
    try:
        httpx.post(f"{lb.url}/generate", json={"text": "x"}, headers={"x-request-id": "log-1"})
        httpx.post(f"{lb.url}/generate", json={"text": "x", "stream": True},
                   headers={"x-request-id": "log-2"})
        httpx.get(f"{lb.url}/nowhere", headers={"x-request-id": "log-3"})
        lines = {}
        for line in lb.output().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                lines[entry["request_id"]] = entry
        assert {"log-1", "log-2", "log-3"} <= set(lines)
        first = lines["log-1"]
        assert first["status"] == 200 and first["path"] == "/generate"
        assert first["prefill"] == prefills[0].url and first["decode"] == decodes[0].url
        room = decodes[0].stats()["recent_pairs"][-2]["room"]
        assert first["room"] == room
        assert first["upstream_ttfb_ms"] > 0 and first["bytes"] > 0
        assert lines["log-3"]["status"] == 404 and lines["log-3"]["prefill"] is None
    finally:
        lb.stop()


def test_status_command_shows_every_server(sims: list[SimProc]) -> None:
    prefills, decodes = split(sims)
    lb: Balancer = start_balancer(make_config(prefills, decodes))
    try:
        for _ in range(4):
            httpx.post(f"{lb.url}/generate", json={"text": "x"})
        parsed = parse_metrics(httpx.get(f"{lb.url}/metrics").text)
        assert parsed[decodes[0].url]["minilb_upstream_requests_total"] == 2
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINILB_")}
        env["COLUMNS"] = "200"
        result = subprocess.run([sys.executable, "-m", "minilb", "status", "--url", lb.url],
                                capture_output=True, text=True, timeout=30, env=env)
        assert result.returncode == 0, result.stderr
        for sim in sims:
            assert sim.url in result.stdout
        assert "healthy" in result.stdout
        result = subprocess.run([sys.executable, "-m", "minilb", "status", "--url", "http://127.0.0.1:9"],
                                capture_output=True, text=True, timeout=30, env=env)
        assert result.returncode == 1 and "cannot reach" in result.stderr
    finally:
        lb.stop()
