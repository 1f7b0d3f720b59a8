"""Retries, health checks, membership at run time, access keys and admission control."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.balancer import Balancer, make_config, start_balancer
from tests.integration.conftest import split, wait_until
from tests.procs import SimProc, start_sim

SIMS = (2, 2)
pytestmark = pytest.mark.usefixtures("clean_sims")


def generated(sims: list[SimProc]) -> list[int]:
    return [s.stats()["requests"].get("/generate", 0) for s in sims]


@pytest.fixture(scope="module")
def lb(sims: list[SimProc]) -> Iterator[Balancer]:
    prefills, decodes = split(sims)
    config = make_config(prefills, decodes, health_check_interval_secs=0.2,
                         health_failure_threshold=1, health_success_threshold=1)
    balancer = start_balancer(config, mode="gunicorn", workers=3)
    yield balancer
    balancer.stop()


# retries


def test_a_5xx_is_retried_on_another_pair(lb: Balancer, sims: list[SimProc]) -> None:
    _, decodes = split(sims)
    for d in decodes:
        d.set_knobs(fail_next=1, fail_status=500)
    r = httpx.post(f"{lb.url}/generate", json={"text": "x"}, timeout=10)
    # Each decode fails once. The second attempt avoided the decode that had just
    # failed (or it would have succeeded there), so it took a third one to succeed.
    assert r.status_code == 200, r.text
    assert sum(generated(decodes)) == 3
    assert [d.stats()["failures_injected"] for d in decodes] == [1, 1]


def test_a_4xx_is_passed_on_and_never_retried(lb: Balancer, sims: list[SimProc]) -> None:
    _, decodes = split(sims)
    for d in decodes:
        d.set_knobs(fail_next=1, fail_status=400)
    r = httpx.post(f"{lb.url}/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 400
    assert sum(generated(decodes)) == 1


def test_no_retry_once_the_stream_has_started(lb: Balancer, sims: list[SimProc]) -> None:
    _, decodes = split(sims)
    for d in decodes:
        d.set_knobs(reset_after_events=1)
    body = {"text": "x", "sampling_params": {"max_new_tokens": 5}, "stream": True}
    r = httpx.post(f"{lb.url}/generate", json=body, timeout=10)
    assert r.status_code == 200
    assert '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")
    assert sum(generated(decodes)) == 1


# health checks


def workers_by_url(lb: Balancer) -> dict[str, dict[str, object]]:
    return {w["url"]: w for w in httpx.get(f"{lb.url}/workers").json()["workers"]}


def test_unhealthy_server_leaves_every_workers_rotation_and_comes_back(
    lb: Balancer, sims: list[SimProc]
) -> None:
    _, decodes = split(sims)
    sick, well = decodes
    sick.set_knobs(health_fail=True)
    assert wait_until(lambda: workers_by_url(lb)[sick.url]["healthy"] is False, 2.0)
    with httpx.Client(base_url=lb.url, timeout=10) as client:
        for _ in range(30):  # spread over the three workers by the kernel
            assert client.post("/generate", json={"text": "x"}).status_code == 200
    assert generated([sick, well]) == [0, 30]
    assert httpx.get(f"{lb.url}/readiness").status_code == 200

    well.set_knobs(health_fail=True)
    assert wait_until(lambda: httpx.get(f"{lb.url}/readiness").status_code == 503, 2.0)
    r = httpx.get(f"{lb.url}/readiness")
    assert "no healthy decode" in r.json()["error"]["message"]
    start = time.monotonic()
    r = httpx.post(f"{lb.url}/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 503 and "decode" in r.json()["error"]["message"]
    assert time.monotonic() - start < 1.0

    sick.set_knobs(health_fail=False)
    well.set_knobs(health_fail=False)
    assert wait_until(lambda: httpx.get(f"{lb.url}/readiness").status_code == 200, 2.0)
    assert all(w["healthy"] for w in workers_by_url(lb).values())


def test_the_prober_moves_to_another_worker_when_its_worker_dies(
    lb: Balancer, sims: list[SimProc]
) -> None:
    import os
    import signal

    for pid in lb.workers():  # whoever holds the prober lease dies with the others
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: len(lb.workers()) == 3, 10.0)
    _, decodes = split(sims)
    decodes[0].set_knobs(health_fail=True)
    assert wait_until(lambda: workers_by_url(lb)[decodes[0].url]["healthy"] is False, 5.0)


# membership


def test_servers_added_and_removed_at_run_time(lb: Balancer, sims: list[SimProc]) -> None:
    _, decodes = split(sims)
    extra = start_sim("decode")
    try:
        r = httpx.post(f"{lb.url}/workers", json={"url": extra.url, "role": "decode"})
        assert r.status_code == 201, r.text
        listed = workers_by_url(lb)
        assert listed[extra.url]["role"] == "decode" and listed[extra.url]["healthy"] is True
        r = httpx.post(f"{lb.url}/workers", json={"url": extra.url, "role": "decode"})
        assert r.status_code == 409 and "already registered" in r.json()["error"]["message"]
        with httpx.Client(base_url=lb.url, timeout=10) as client:
            for _ in range(60):
                assert client.post("/generate", json={"text": "x"}).status_code == 200
        assert generated([*decodes, extra]) == [20, 20, 20]

        # A stream in flight on a server being removed finishes.
        extra.set_knobs(itl=0.05)
        results: list[httpx.Response] = []

        def long_streams() -> None:
            body = {"text": "x", "sampling_params": {"max_new_tokens": 30}, "stream": True}
            with httpx.Client(base_url=lb.url, timeout=20) as client:
                results.extend(client.post("/generate", json=body) for _ in range(3))

        thread = threading.Thread(target=long_streams)
        thread.start()
        assert wait_until(lambda: extra.stats()["in_flight"] == 1, 5.0)
        r = httpx.delete(f"{lb.url}/workers/{quote(extra.url, safe='')}")
        assert r.status_code == 200, r.text
        thread.join()
        assert all(x.status_code == 200 and x.text.endswith("data: [DONE]\n\n") for x in results)
        assert all('"error"' not in x.text for x in results)
        assert extra.url not in workers_by_url(lb)
        served = extra.stats()["requests"].get("/generate", 0)
        with httpx.Client(base_url=lb.url, timeout=10) as client:
            for _ in range(10):
                assert client.post("/generate", json={"text": "x"}).status_code == 200
        assert extra.stats()["requests"].get("/generate", 0) == served
        r = httpx.delete(f"{lb.url}/workers/{quote(extra.url, safe='')}")
        assert r.status_code == 404
    finally:
        extra.stop()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"mode": "decode", "registry_url": "http://127.0.0.1:9", "bootstrap_port": 5}, 400, "must not"),
        ({"mode": "prefill", "registry_url": "http://127.0.0.1:9"}, 400, "bootstrap_port"),
        ({"mode": "prefill", "registry_url": "127.0.0.1:9", "bootstrap_port": 5}, 400, "http://host:port"),
        ({"mode": "gpu", "registry_url": "http://127.0.0.1:9"}, 400, "$.mode"),
    ],
)
def test_register_rules(lb: Balancer, body: dict[str, object], status: int, words: str) -> None:
    r = httpx.post(f"{lb.url}/register", json=body)
    assert r.status_code == status and words in r.json()["error"]["message"]


def test_sglang_register(lb: Balancer, sims: list[SimProc]) -> None:
    extra = start_sim("prefill")
    try:
        r = httpx.post(f"{lb.url}/register", json={
            "mode": "prefill", "registry_url": extra.url, "bootstrap_port": extra.bootstrap_port})
        assert r.status_code == 200, r.text
        with httpx.Client(base_url=lb.url, timeout=10) as client:
            for _ in range(30):
                assert client.post("/generate", json={"text": "x"}).status_code == 200
        assert extra.stats()["rooms_paired"] == 10
        assert httpx.delete(f"{lb.url}/workers/{quote(extra.url, safe='')}").status_code == 200
    finally:
        extra.stop()


# access keys and admission


def test_keys_guard_their_routes(sims: list[SimProc]) -> None:
    prefills, decodes = split(sims)
    lb = start_balancer(make_config(prefills, decodes, admin_key="adm1n", api_key="cl1ent"))
    try:
        body = {"text": "x"}
        r = httpx.post(f"{lb.url}/generate", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        bad = {"authorization": "Bearer adm1n"}
        assert httpx.post(f"{lb.url}/generate", json=body, headers=bad).status_code == 401
        ok = {"authorization": "Bearer cl1ent"}
        assert httpx.post(f"{lb.url}/generate", json=body, headers=ok).status_code == 200
        # The client's key is minilb's, so it is not passed on to the servers.
        served = [r for r in (s.last_request() for s in sims) if r is not None]
        assert len(served) == 2  # the prefill and the decode of that one request
        assert all("authorization" not in r["headers"] for r in served)
        assert httpx.get(f"{lb.url}/workers").status_code == 401
        assert httpx.post(f"{lb.url}/flush_cache", headers=ok).status_code == 401
        admin = {"authorization": "Bearer adm1n"}
        assert httpx.get(f"{lb.url}/workers", headers=admin).status_code == 200
        assert httpx.get(f"{lb.url}/health").status_code == 200
    finally:
        lb.stop()


def test_in_flight_cap_is_global_across_workers(sims: list[SimProc]) -> None:
    prefills, decodes = split(sims)
    lb = start_balancer(make_config(prefills, decodes, max_in_flight=2), mode="gunicorn", workers=2)
    try:
        for d in decodes:
            d.set_knobs(itl=0.1)
        body = {"text": "x", "sampling_params": {"max_new_tokens": 10}}

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=20, limits=limits) as client:
                return await asyncio.gather(*(client.post(f"{lb.url}/generate", json=body)
                                              for _ in range(8)))

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200] + [429] * 6, statuses
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert "limit of 2" in rejected.json()["error"]["message"]
        # The count goes back down: the next requests are admitted.
        for d in decodes:
            d.set_knobs(itl=0.0)
        assert httpx.post(f"{lb.url}/generate", json=body, timeout=10).status_code == 200
    finally:
        lb.stop()
