"""`minilb demo`, the README's first command, end to end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.balancer import children
from tests.procs import free_port


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_demo_serves_and_stops_everything_on_ctrl_c() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINILB_")}
    proc = subprocess.Popen([sys.executable, "-m", "minilb", "demo", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        body = {"text": "Hello, my name is", "sampling_params": {"max_new_tokens": 8}}
        r = httpx.post(f"{url}/generate", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["text"].startswith("tok0 tok1")
        info = httpx.get(f"{url}/get_server_info", timeout=10).json()
        assert len(info["prefill"]) == 2 and len(info["decode"]) == 2
        spawned = descendants(proc.pid)
        assert len(spawned) >= 6  # four simulators and two workers
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()
    assert f"curl {url}/generate" in out.decode()
    alive = [pid for pid in spawned if running(pid)]
    assert not alive, f"left running: {alive}"
