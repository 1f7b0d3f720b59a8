"""What the client sees when servers are down, slow or hanging, and what is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.balancer import Balancer, make_config, start_balancer
from tests.integration.conftest import KNOBS_OFF, wait_until
from tests.procs import SimProc, free_port

SIMS = (1, 1)
pytestmark = pytest.mark.usefixtures("clean_sims")


@pytest.fixture(scope="module")
def short_timeout_lb(sims: list[SimProc]) -> Iterator[Balancer]:
    lb = start_balancer(make_config(sims[:1], sims[1:], timeout_secs=1.0, max_attempts=1))
    yield lb
    lb.stop()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def error_of(r: httpx.Response) -> dict[str, object]:
    error: dict[str, object] = r.json()["error"]
    return error


def test_decode_down_gives_502_and_frees_the_prefill(sims: list[SimProc]) -> None:
    prefill = sims[0]
    dead = SimProc("decode", free_port(), None, popen=None)  # type: ignore[arg-type]
    lb = start_balancer(make_config([prefill], [dead]))
    try:
        start = time.monotonic()
        r = httpx.post(f"{lb.url}/generate", json={"text": "x"}, timeout=10)
        assert r.status_code == 502
        message = str(error_of(r)["message"])
        assert "decode server" in message and dead.url in message
        assert time.monotonic() - start < 3.0
        assert wait_until(lambda: prefill.stats()["in_flight"] == 0, 1.0)
    finally:
        lb.stop()


def test_prefill_down_gives_502_and_frees_the_decode(sims: list[SimProc]) -> None:
    decode = sims[1]
    dead = SimProc("prefill", free_port(), free_port(), popen=None)  # type: ignore[arg-type]
    lb = start_balancer(make_config([dead], [decode]))
    try:
        r = httpx.post(f"{lb.url}/generate", json={"text": "x", "stream": True}, timeout=10)
        assert r.status_code == 502
        assert "prefill server" in str(error_of(r)["message"])
        assert wait_until(lambda: decode.stats()["in_flight"] == 0, 1.0)
        # Three attempts (the default), each decode request closed when its prefill failed.
        assert decode.stats()["client_disconnects"] == 3
        r = httpx.get(f"{lb.url}/v1/models")
        assert r.status_code == 502 and dead.url in str(error_of(r)["message"])
    finally:
        lb.stop()


def test_hanging_decode_gives_504_and_closes_both(
    short_timeout_lb: Balancer, sims: list[SimProc]
) -> None:
    sims[1].set_knobs(hang=True)
    start = time.monotonic()
    r = httpx.post(f"{short_timeout_lb.url}/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 504
    assert "1 s" in str(error_of(r)["message"])
    assert time.monotonic() - start < 3.0
    for sim in sims:
        assert wait_until(lambda s=sim: s.stats()["in_flight"] == 0, 1.0), sim.role  # type: ignore[misc]


def test_stream_that_outlives_the_timeout_ends_with_an_error_event(
    short_timeout_lb: Balancer, sims: list[SimProc]
) -> None:
    sims[1].set_knobs(itl=0.3)
    body = {"text": "x", "sampling_params": {"max_new_tokens": 20}, "stream": True}
    r = httpx.post(f"{short_timeout_lb.url}/generate", json=body, timeout=10)
    assert r.status_code == 200
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 504
    assert 1 <= len(events) - 2 < 20
    assert wait_until(lambda: sims[1].stats()["in_flight"] == 0, 1.0)


def test_slow_headers_within_the_timeout_succeed(short_timeout_lb: Balancer, sims: list[SimProc]) -> None:
    sims[1].set_knobs(slow_headers=0.3)
    r = httpx.post(f"{short_timeout_lb.url}/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 200, r.text


def test_faults_leak_no_connections(short_timeout_lb: Balancer, sims: list[SimProc]) -> None:
    lb = short_timeout_lb
    with httpx.Client(base_url=lb.url, timeout=10) as client:
        for _ in range(5):
            assert client.post("/generate", json={"text": "warm"}).status_code == 200
        before = open_fds(lb.popen.pid)
        faults = [
            (sims[1], {"fail_next": 3, "fail_status": 500}),
            (sims[0], {"fail_next": 3, "fail_status": 503}),
            (sims[1], {"reset_after_events": 1}),
            (sims[1], {"hang": True}),
        ]
        for sim, knobs in faults:
            sim.set_knobs(**knobs)
            for stream in (False, True, False):
                client.post("/generate", json={"text": "x", "stream": stream})
            sim.set_knobs(**KNOBS_OFF)
        for _ in range(5):
            assert client.post("/generate", json={"text": "again"}).status_code == 200
    for sim in sims:
        assert wait_until(lambda s=sim: s.stats()["in_flight"] == 0, 2.0), sim.role  # type: ignore[misc]
    # Failed exchanges abort their connections; only the pool's idle ones stay open.
    assert open_fds(lb.popen.pid) <= before + 2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINILB_")}
    return subprocess.run([sys.executable, "-m", "minilb", *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: object) -> None:
    result = run_cli("serve", "--prefill", "localhost:30000", "--decode", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert "'localhost:30000' is not http://host:port" in result.stderr
    result = run_cli("serve", "--decode", "http://127.0.0.1:1")
    assert result.returncode == 2 and "no prefill server" in result.stderr


def test_check_config(tmp_path: os.PathLike[str]) -> None:
    good = os.path.join(tmp_path, "good.toml")
    with open(good, "w") as f:
        f.write('[[prefill]]\nurl = "http://127.0.0.1:30000"\nbootstrap_port = 30001\n'
                '[[decode]]\nurl = "http://127.0.0.1:31000"\n')
    result = run_cli("check-config", good)
    assert result.returncode == 0 and "valid" in result.stdout and "30001" in result.stdout
    bad = os.path.join(tmp_path, "bad.toml")
    with open(bad, "w") as f:
        f.write('workers = 0\n[[prefill]]\nurl = "http://x:1"\n[[decode]]\nurl = "http://y:1"\n')
    result = run_cli("check-config", bad)
    assert result.returncode == 2 and "$.workers" in result.stderr


def test_demo_refuses_a_port_in_use(tmp_path: object) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("demo", "--port", str(port))
    assert result.returncode == 2 and "in use" in result.stderr
