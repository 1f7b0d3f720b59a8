"""`minilb demo`: simulated prefill and decode servers behind the balancer, no GPU needed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from minilb import config as config_mod
from minilb.errors import ConfigError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"port {port} on {host} is in use ({exc.strerror}); pick another with --port"
            ) from None


def start_simulator(role: str, port: int, bootstrap_port: int | None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "minilb", "sim", "--role", role, "--host", "127.0.0.1",
            "--port", str(port)]
    if bootstrap_port is not None:
        args += ["--bootstrap-port", str(bootstrap_port)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(b"minilb-sim ready"):
            # Keep reading, so a chatty simulator never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    proc.kill()
    raise ConfigError(f"the {role} simulator on port {port} did not start")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_demo(*, host: str, port: int, workers: int) -> None:
    from minilb.serve import run

    _check_port_free(host, port)
    procs: list[subprocess.Popen[bytes]] = []
    prefill: list[dict[str, object]] = []
    decode: list[dict[str, object]] = []
    try:
        for _ in range(2):
            p_port, b_port = free_port(), free_port()
            procs.append(start_simulator("prefill", p_port, b_port))
            prefill.append({"url": f"http://127.0.0.1:{p_port}", "bootstrap_port": b_port})
        for _ in range(2):
            d_port = free_port()
            procs.append(start_simulator("decode", d_port, None))
            decode.append({"url": f"http://127.0.0.1:{d_port}"})
        config = config_mod.build(host=host, port=port, workers=workers, prefill=prefill, decode=decode)
        base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        print(_banner(base, prefill, decode), flush=True)
        run(config)
    finally:
        stop(procs)
        with contextlib.suppress(KeyError):
            del os.environ[config_mod.CONFIG_JSON_ENV]


def _banner(base: str, prefill: list[dict[str, object]], decode: list[dict[str, object]]) -> str:
    servers = "\n".join(
        [f"  prefill {p['url']} (bootstrap port {p['bootstrap_port']})" for p in prefill]
        + [f"  decode  {d['url']}" for d in decode]
    )
    return f"""minilb demo: simulated SGLang servers (no GPU) behind the balancer at {base}
{servers}

Try, from another terminal:
  curl {base}/health
  curl {base}/v1/models
  curl {base}/generate -H 'Content-Type: application/json' \\
       -d '{{"text": "Hello, my name is", "sampling_params": {{"max_new_tokens": 8}}}}'
  curl -N {base}/generate -H 'Content-Type: application/json' \\
       -d '{{"text": "Hello", "sampling_params": {{"max_new_tokens": 8}}, "stream": true}}'
  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "sim-model", "messages": [{{"role": "user", "content": "Hi"}}]}}'
  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "sim-model", "messages": [{{"role": "user", "content": "Hi"}}], "stream": true}}'

Ctrl-C stops the balancer and the simulators.
"""
