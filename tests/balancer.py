"""Start minilb for tests: under uvicorn (one process) or Gunicorn (several workers)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx
import msgspec

from minilb.config import CONFIG_ENV, CONFIG_JSON_ENV, Config, build
from tests.procs import SimProc, free_port

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0

Mode = Literal["uvicorn", "serve", "gunicorn"]


def make_config(prefills: list[SimProc], decodes: list[SimProc], **values: Any) -> Config:
    return build(
        prefill=[{"url": p.url, "bootstrap_port": p.bootstrap_port} for p in prefills],
        decode=[{"url": d.url} for d in decodes],
        **values,
    )


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (Gunicorn's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


@dataclass
class Balancer:
    port: int
    popen: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        return children(self.popen.pid)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log.name)


def start_balancer(config: Config, *, mode: Mode = "uvicorn", workers: int = 1) -> Balancer:
    """Start minilb on a free port and wait until /health answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINILB_")}
    env["PYTHONUNBUFFERED"] = "1"
    if mode == "uvicorn":
        env[CONFIG_JSON_ENV] = config.to_json()
        args = [sys.executable, "-m", "uvicorn", "minilb.app:app", "--host", "127.0.0.1",
                "--port", str(port), "--loop", "uvloop", "--http", "httptools",
                "--log-level", "warning", "--no-access-log"]
    elif mode == "serve":
        args = [sys.executable, "-m", "minilb", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers), "--request-timeout-secs", str(config.timeout_secs),
                "--max-body-bytes", str(config.max_body_bytes), "--policy", config.policy]
        for p in config.prefill:
            args += ["--prefill", p.url, str(p.bootstrap_port or "none")]
        for d in config.decode:
            args += ["--decode", d.url]
    else:
        toml = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
        with toml:
            toml.write(_to_toml(config))
        env[CONFIG_ENV] = toml.name
        env["MINILB_BIND"] = f"127.0.0.1:{port}"
        env["MINILB_WORKERS"] = str(workers)
        args = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                "minilb.app:app"]
    log = tempfile.NamedTemporaryFile(prefix="minilb-lb-", suffix=".log", delete=False)  # noqa: SIM115
    popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    lb = Balancer(port=port, popen=popen, log=log)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            healthy = httpx.get(f"{lb.url}/health", timeout=1.0).status_code == 200
            if healthy and (mode == "uvicorn" or len(lb.workers()) >= workers):
                return lb
        time.sleep(0.1)
    text = lb.output()
    lb.stop()
    raise RuntimeError(f"minilb ({mode}) did not start on port {port}; output:\n{text}")


def _to_toml(config: Config) -> str:
    """The config as a TOML file (JSON scalars are TOML scalars); None values are left out."""
    data = msgspec.to_builtins(config)
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items()
             if v is not None and k not in ("prefill", "decode")]
    for role in ("prefill", "decode"):
        for server in data[role]:
            lines.append(f"[[{role}]]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in server.items() if v is not None)
    return "\n".join(lines) + "\n"
