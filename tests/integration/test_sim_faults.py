"""Fault and latency knobs, counters and admin routes of real simulator processes."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.procs import SimProc, pd_fields, post, post_both, sim_pair, sse_events, start_sim

TIMEOUT = 1.0
DEFAULT_KNOBS: dict[str, Any] = {
    "pair_timeout": TIMEOUT,
    "prefill_delay_per_token": 0.0,
    "ttft": 0.0,
    "itl": 0.0,
    "jitter": 0.0,
    "fail_status": 500,
    "fail_probability": 0.0,
    "fail_next": 0,
    "reset_after_events": 0,
    "hang": False,
    "slow_headers": 0.0,
    "health_fail": False,
    "bootstrap_down": False,
    "skip_bootstrap": False,
    "max_new_tokens_default": 16,
}


@pytest.fixture(scope="module")
def pd() -> Iterator[tuple[SimProc, SimProc]]:
    with sim_pair(TIMEOUT) as pair:
        yield pair


@pytest.fixture(autouse=True)
def fresh(pd: tuple[SimProc, SimProc]) -> None:
    for proc in pd:
        proc.set_knobs(**DEFAULT_KNOBS)
        proc.reset()


def gen(prefill: SimProc, **extra: Any) -> dict[str, Any]:
    return {
        "text": "a b",
        "sampling_params": {"max_new_tokens": 4},
        **pd_fields(prefill, random.randrange(2**63)),
        **extra,
    }


def pair(
    pd: tuple[SimProc, SimProc],
    body: dict[str, Any],
    path: str = "/generate",
    timeout: float = 10.0,
) -> tuple[httpx.Response, httpx.Response]:
    prefill, decode = pd
    return post_both(f"{prefill.url}{path}", f"{decode.url}{path}", body, timeout=timeout)


def test_knobs_get_post_and_validation(pd: tuple[SimProc, SimProc]) -> None:
    prefill, _ = pd
    knobs = httpx.get(f"{prefill.url}/_sim/knobs").json()
    assert knobs == DEFAULT_KNOBS
    changed = httpx.post(f"{prefill.url}/_sim/knobs", json={"fail_next": 2, "fail_status": 503})
    assert changed.status_code == 200 and changed.json()["fail_next"] == 2
    for bad in ({"jitter": 5}, {"fail_status": 42}, {"bogus": 1}, {"hang": "yes"}):
        response = httpx.post(f"{prefill.url}/_sim/knobs", json=bad)
        assert response.status_code == 400, bad
    assert httpx.get(f"{prefill.url}/_sim/knobs").json()["fail_status"] == 503


def test_fail_next(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    decode.set_knobs(fail_next=2, fail_status=503)
    for _ in range(2):
        response = post(f"{decode.url}/generate", gen(prefill))
        assert response.status_code == 503 and "simulated failure" in response.text
    chat = {"messages": [{"role": "user", "content": "x"}], **pd_fields(prefill, 1)}
    decode.set_knobs(fail_next=1)
    failed = post(f"{decode.url}/v1/chat/completions", chat)
    assert failed.status_code == 503 and failed.json()["object"] == "error"
    p, d = pair(pd, gen(prefill))
    assert p.status_code == d.status_code == 200
    stats = decode.stats()
    assert stats["failures_injected"] == 3 and stats["generate_requests"] == 4


def test_fail_probability(pd: tuple[SimProc, SimProc]) -> None:
    prefill, _ = pd
    prefill.set_knobs(fail_probability=1.0, fail_status=502)
    assert post(f"{prefill.url}/generate", gen(prefill)).status_code == 502


def test_reset_after_events(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    decode.set_knobs(reset_after_events=2)
    body = gen(prefill, stream=True)
    with ThreadPoolExecutor(1) as pool:
        p = pool.submit(post, f"{prefill.url}/generate", body)
        received: list[bytes] = []
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", f"{decode.url}/generate", json=body, timeout=5) as response,
        ):
            for chunk in response.iter_raw():
                received.append(chunk)
        assert p.result().status_code == 200
    assert b"".join(received).count(b"data: ") == 2
    assert decode.stats()["resets_injected"] == 1


def test_hang_until_client_leaves(pd: tuple[SimProc, SimProc]) -> None:
    prefill, _ = pd
    prefill.set_knobs(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        post(f"{prefill.url}/generate", gen(prefill), timeout=0.5)
    deadline = time.monotonic() + 2
    while prefill.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = prefill.stats()
    assert stats["in_flight"] == 0 and stats["client_disconnects"] == 1


def test_slow_headers(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    decode.set_knobs(slow_headers=0.4)
    body = gen(prefill, stream=True)
    with ThreadPoolExecutor(1) as pool:
        p = pool.submit(post, f"{prefill.url}/generate", body)
        start = time.monotonic()
        with httpx.stream("POST", f"{decode.url}/generate", json=body, timeout=5) as response:
            headers_after = time.monotonic() - start
            assert response.status_code == 200
            response.read()
        assert p.result().status_code == 200
    assert 0.35 <= headers_after < 1.0


def test_latency_knobs(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    decode.set_knobs(ttft=0.2, itl=0.05, jitter=0.1)
    prefill.set_knobs(prefill_delay_per_token=0.1)
    start = time.monotonic()
    p, d = pair(pd, gen(prefill))  # 2 prompt tokens, 4 output tokens
    elapsed = time.monotonic() - start
    assert p.status_code == d.status_code == 200
    assert 0.2 + 3 * 0.05 * 0.9 <= elapsed < 1.5
    assert p.json()["meta_info"]["e2e_latency"] >= 0.18


def test_health_fail(pd: tuple[SimProc, SimProc]) -> None:
    prefill, _ = pd
    prefill.set_knobs(health_fail=True)
    assert httpx.get(f"{prefill.url}/health").status_code == 503
    assert httpx.get(f"{prefill.url}/health_generate").status_code == 503


def test_bootstrap_down(pd: tuple[SimProc, SimProc]) -> None:
    prefill, _ = pd
    prefill.set_knobs(bootstrap_down=True)
    assert prefill.bootstrap_port is not None
    with socket.create_connection(("127.0.0.1", prefill.bootstrap_port), timeout=2) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b""
    p, d = pair(pd, gen(prefill))
    assert p.status_code == d.status_code == 500
    assert "WaitingForInput" in d.text


def test_skip_bootstrap(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    decode.set_knobs(skip_bootstrap=True)
    p, d = pair(pd, gen(prefill))
    assert p.status_code == d.status_code == 500
    assert "Bootstrapping" in p.text and "WaitingForInput" in d.text
    assert prefill.stats()["rooms_timed_out"] == decode.stats()["rooms_timed_out"] == 1


def test_max_new_tokens_default_knob(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    decode.set_knobs(max_new_tokens_default=2)
    _, d = pair(pd, {"text": "x", **pd_fields(prefill, random.randrange(2**63))})
    assert d.json()["text"] == "tok0 tok1"


def test_counters(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    decode.set_knobs(itl=0.05)
    body = gen(prefill, stream=True)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(pair, pd, gen(prefill, stream=True)) for _ in range(3)]
        results = [f.result() for f in futures]
    assert all(p.status_code == d.status_code == 200 for p, d in results)
    httpx.get(f"{decode.url}/health", headers={"X-Test": "yes"})
    stats = decode.stats()
    assert stats["role"] == "decode"
    assert stats["requests"] == {"/generate": 3, "/health": 1}
    assert stats["generate_requests"] == 3 and stats["in_flight"] == 0
    assert stats["max_in_flight"] == 3
    assert stats["rooms_paired"] == 3 and len(stats["recent_pairs"]) == 3
    assert stats["events_sent"] == 3 * 5  # 4 tokens + [DONE]
    assert stats["bytes_sent"] == sum(len(d.content) for _, d in results)
    assert stats["connections_opened"] >= 1
    last = stats["recent_requests"][-1]
    assert last["path"] == "/health" and last["headers"]["x-test"] == "yes"
    first = stats["recent_requests"][0]
    assert first["path"] == "/generate" and '"stream":true' in first["body"]
    assert body["stream"] is True
    decode.reset()
    cleared = decode.stats()
    assert cleared["requests"] == {} and cleared["recent_requests"] == []
    assert httpx.get(f"{decode.url}/_sim/knobs").json()["itl"] == 0.05  # knobs kept


def test_abort_request(pd: tuple[SimProc, SimProc]) -> None:
    prefill, _ = pd
    prefill.set_knobs(hang=True)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, f"{prefill.url}/generate", gen(prefill, rid="r1"))
        time.sleep(0.2)
        httpx.post(f"{prefill.url}/abort_request", json={"rid": "r1"})
        response = waiting.result()
    assert response.status_code == 200
    assert response.json()["meta_info"]["finish_reason"]["type"] == "abort"


def test_sigterm_exits_cleanly() -> None:
    proc = start_sim("prefill")
    os.kill(proc.popen.pid, signal.SIGTERM)
    assert proc.popen.wait(5) == 0
    proc.stop()


def test_sse_helper_and_stream_events_count(pd: tuple[SimProc, SimProc]) -> None:
    prefill, _ = pd
    p, d = pair(pd, gen(prefill, stream=True))
    assert sse_events(p)[-1] == sse_events(d)[-1] == "[DONE]"
    assert prefill.stats()["events_sent"] == 2
