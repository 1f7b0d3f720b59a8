"""Start simulator processes (`minilb sim`) for tests, on free loopback ports.

Output goes to a temporary file, not a pipe: a pipe nobody reads fills up
after 64 KiB and then blocks the simulator in the middle of a test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import httpx

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def _sim_command() -> list[str]:
    return [sys.executable, "-m", "minilb", "sim"]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class SimProc:
    """One running simulator process."""

    role: str
    port: int
    bootstrap_port: int | None
    popen: subprocess.Popen[bytes]
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_sim/stats", timeout=5.0)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def last_request(self, path: str = "/generate") -> dict[str, Any] | None:
        """The newest request the simulator saw on `path` (health probes land there too)."""
        seen = [r for r in self.stats()["recent_requests"] if r["path"] == path]
        return seen[-1] if seen else None

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sim/reset", timeout=5.0).raise_for_status()

    def set_knobs(self, **knobs: Any) -> None:
        response = httpx.post(f"{self.url}/_sim/knobs", json=knobs, timeout=5.0)
        if response.status_code != 200:
            raise RuntimeError(f"set_knobs({knobs}) -> {response.status_code} {response.text}")

    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        if self.log is None:
            return ""
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT)
        if self.log is not None:
            self.log.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log.name)
            self.log = None


def start_sim(
    role: str,
    *,
    pair_timeout: float = 5.0,
    extra_args: Sequence[str] = (),
    bootstrap_port: int | None = None,
) -> SimProc:
    """Start `python -m minilb sim` and wait for its ready line.

    A prefill always gets a bootstrap port (a free one unless given); a
    decode gets `--bootstrap-port` only when `bootstrap_port` is given (the
    fallback port it uses for `bootstrap_port: null`).
    """
    port = free_port()
    if role == "prefill" and bootstrap_port is None:
        bootstrap_port = free_port()
    args = [
        *_sim_command(),
        "--role",
        role,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--pair-timeout",
        str(pair_timeout),
    ]
    if bootstrap_port is not None:
        args += ["--bootstrap-port", str(bootstrap_port)]
    args += list(extra_args)
    # Closed by SimProc.stop(), which also deletes it.
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115
        prefix=f"minilb-sim-{role}-", suffix=".log", delete=False
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINILB_SIM_")}
    env["PYTHONUNBUFFERED"] = "1"
    popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc = SimProc(role=role, port=port, bootstrap_port=bootstrap_port, popen=popen, log=log)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = proc.output()
        if "minilb-sim ready" in text:
            return proc
        if popen.poll() is not None:
            break
        time.sleep(0.05)
    text = proc.output()
    proc.stop()
    raise RuntimeError(
        f"simulator {role} on port {port} did not become ready within {READY_TIMEOUT} s "
        f"(exit code {popen.returncode}); output:\n{text}"
    )


# -- a small PD client for simulator tests (deliberately not minilb's code) --


def pd_fields(prefill: SimProc, room: int | None) -> dict[str, Any]:
    """The three bootstrap fields that pair a request with `prefill`."""
    return {
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": prefill.bootstrap_port,
        "bootstrap_room": room,
    }


def post(url: str, body: dict[str, Any], *, timeout: float = 10.0) -> httpx.Response:
    """POST a JSON body and read the whole response."""
    return httpx.post(url, json=body, timeout=timeout)


def post_both(
    prefill_url: str, decode_url: str, body: dict[str, Any], *, timeout: float = 10.0
) -> tuple[httpx.Response, httpx.Response]:
    """Send the same body to a prefill and a decode at the same time (as a PD balancer must)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        p = pool.submit(post, prefill_url, body, timeout=timeout)
        d = pool.submit(post, decode_url, body, timeout=timeout)
        return p.result(), d.result()


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of a text/event-stream body, `[DONE]` included."""
    return [
        block[len("data: ") :]
        for block in response.text.split("\n\n")
        if block.startswith("data: ")
    ]


@contextlib.contextmanager
def sim_pair(pair_timeout: float = 5.0) -> Iterator[tuple[SimProc, SimProc]]:
    """A prefill and a decode simulator, stopped on exit."""
    prefill = start_sim("prefill", pair_timeout=pair_timeout)
    try:
        decode = start_sim("decode", pair_timeout=pair_timeout)
        try:
            yield prefill, decode
        finally:
            decode.stop()
    finally:
        prefill.stop()
