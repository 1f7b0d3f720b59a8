#!/usr/bin/env python3
"""Soak minilb: mixed load with faults injected, for minutes, and count what was lost.

Starts 2 prefill and 2 decode simulators (`minilb sim`) and minilb under Gunicorn with
2 workers (`minilb serve`), all on 127.0.0.1, then runs `--concurrency` clients for
`--minutes`: /generate (single, batch, stream, logprobs), chat and completions. Meanwhile
it injects faults through the simulators' `POST /_sim/knobs` (failures with 500 and 400,
stream resets, slow headers, a short hang, flapping health) and once kills a decode with
SIGKILL and restarts it on the same port.

Every request ends one of three ways: a complete answer; an explicit error (a 4xx/5xx in
the OpenAI error shape, or an SSE `data: {"error": ...}` event followed by `[DONE]`); or
neither, which is a *lost* request (a dropped connection, a truncated stream, a hang past
the client's timeout, an error without the shape). It prints progress every 30 s and a
summary; the exit code is 1 when any request was lost or minilb died.

    python scripts/soak.py --minutes 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
PROGRESS_EVERY = 30.0
CLIENT_TIMEOUT = 30.0  # past minilb's own timeout below, so a hang shows up as its 504 first
LB_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process we started; stopped by its PID, never by name."""

    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINILB_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            # A new session: Ctrl-C in the terminal reaches this script only, which then
            # stops the children in order.
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)
        try:
            self.popen.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


@dataclass
class Sim:
    role: str
    port: int
    bootstrap_port: int | None
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @classmethod
    def make(cls, role: str, logs: Path, index: int) -> Sim:
        port = free_port()
        bootstrap = free_port() if role == "prefill" else None
        args = [sys.executable, "-m", "minilb", "sim", "--role", role, "--host", HOST, "--port", str(port),
                "--pair-timeout", "5"]
        if bootstrap is not None:
            args += ["--bootstrap-port", str(bootstrap)]
        return cls(role, port, bootstrap, Proc(f"{role}{index}", args, logs / f"sim-{role}{index}.log"))

    def start(self) -> None:
        seen = self.proc.output().count("minilb-sim ready")
        self.proc.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.output().count("minilb-sim ready") > seen:
                return
            if not self.proc.alive():
                break
            time.sleep(0.05)
        raise RuntimeError(f"simulator {self.proc.name} did not start:\n{self.proc.output()[-2000:]}")


def start_balancer(prefills: list[Sim], decodes: list[Sim], logs: Path) -> tuple[Proc, int]:
    port = free_port()
    config = logs / "minilb.toml"
    lines = [f"timeout_secs = {LB_TIMEOUT}", "max_attempts = 3", "retry_backoff_secs = 0.02",
             "health_check_interval_secs = 0.5", "health_check_timeout_secs = 1.0",
             "health_failure_threshold = 2", "health_success_threshold = 1"]
    for p in prefills:
        lines += ["[[prefill]]", f'url = "{p.url}"', f"bootstrap_port = {p.bootstrap_port}"]
    for d in decodes:
        lines += ["[[decode]]", f'url = "{d.url}"']
    config.write_text("\n".join(lines) + "\n")
    proc = Proc("minilb", [sys.executable, "-m", "minilb", "serve", "--config", str(config), "--host", HOST,
                           "--port", str(port), "--workers", "2"], logs / "minilb.log")
    proc.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200 \
                    and len(children(proc.pid)) >= 2:
                return proc, port
        time.sleep(0.1)
    raise RuntimeError(f"minilb did not start:\n{proc.output()[-3000:]}")


# -- load ------------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # explicit errors, by kind
    lost: Counter[str] = field(default_factory=Counter)  # neither an answer nor an error
    kinds: Counter[str] = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)
    violations: Counter[str] = field(default_factory=Counter)  # answered, but against the protocol

    def lose(self, why: str, what: str) -> None:
        self.lost[why] += 1
        if len(self.lost_examples) < 10:
            self.lost_examples.append(f"{why}: {what}")


def make_request(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    """(kind, path, body) for one request of the mix."""
    tokens = rng.randint(1, 12)
    stream = rng.random() < 0.5
    roll = rng.random()
    if roll < 0.35:
        return f"generate{'-stream' if stream else ''}", "/generate", {
            "text": "soak " * rng.randint(1, 8), "stream": stream,
            "sampling_params": {"max_new_tokens": tokens}}
    if roll < 0.50:
        n = rng.randint(2, 4)
        return f"batch{'-stream' if stream else ''}", "/generate", {
            "text": [f"item {i}" for i in range(n)], "stream": stream,
            "sampling_params": {"max_new_tokens": tokens}}
    if roll < 0.62:
        return f"logprobs{'-stream' if stream else ''}", "/generate", {
            "input_ids": [1, 2, 3, 4], "return_logprob": True, "stream": stream,
            "sampling_params": {"max_new_tokens": tokens}}
    if roll < 0.88:
        return f"chat{'-stream' if stream else ''}", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    return f"completions{'-stream' if stream else ''}", "/v1/completions", {
        "model": "m", "prompt": "once upon", "max_tokens": tokens, "stream": stream}


def error_shape(body: bytes) -> int | None:
    """The `code` of an OpenAI-shaped error body, else None."""
    try:
        error = json.loads(body)["error"]
        if isinstance(error["message"], str) and isinstance(error["type"], str):
            return int(error["code"])
    except (ValueError, KeyError, TypeError):
        return None
    return None


def complete_answer(kind: str, body: dict[str, Any], answer: Any) -> bool:
    if kind.startswith("batch"):
        return isinstance(answer, list) and len(answer) == len(body["text"]) \
            and all("text" in item for item in answer)
    if kind.startswith(("generate", "logprobs")):
        if not (isinstance(answer, dict) and "text" in answer):
            return False
        return not kind.startswith("logprobs") or bool(answer["meta_info"].get("input_token_logprobs"))
    return isinstance(answer, dict) and bool(answer.get("choices"))


async def one_request(client: httpx.AsyncClient, url: str, rng: random.Random, tally: Tally) -> None:
    kind, path, body = make_request(rng)
    body = {k: v for k, v in body.items() if v is not None}
    tally.sent += 1
    tally.kinds[kind] += 1
    data = b""
    try:
        async with client.stream("POST", url + path, json=body) as response:
            async for chunk in response.aiter_bytes():
                data += chunk
    except httpx.TimeoutException as exc:
        tally.lose(f"client timeout ({type(exc).__name__})", kind)
        return
    except httpx.HTTPError as exc:
        tally.lose(f"transport {type(exc).__name__}", f"{kind}: {exc}")
        return
    status = response.status_code
    if status != 200:
        code = error_shape(data)
        if code == status:
            tally.errors[f"status {status}"] += 1
        else:
            tally.lose(f"status {status} without the error shape", f"{kind}: {data[:200]!r}")
        return
    if body.get("stream"):
        events = [b[6:] for b in data.decode("utf-8", "replace").split("\n\n") if b.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            tally.lose("truncated stream", f"{kind}: ...{data[-200:]!r}")
            return
        if events.count("[DONE]") > 1:
            tally.violations["events after data: [DONE]"] += 1
        errors = [e for e in events[:-1] if e.startswith('{"error"')]
        if errors:
            code = error_shape(errors[-1].encode())
            tally.errors[f"SSE error event ({code})"] += 1
            return
        if len(events) < 2:
            tally.lose("stream without data", f"{kind}: {data[:200]!r}")
            return
        tally.ok += 1
        return
    try:
        answer = json.loads(data)
    except ValueError:
        tally.lose("200 with a body that is not JSON", f"{kind}: {data[:200]!r}")
        return
    if complete_answer(kind, body, answer):
        tally.ok += 1
    else:
        tally.lose("200 with an incomplete answer", f"{kind}: {data[:200]!r}")


async def load(url: str, concurrency: int, until: float, tally: Tally, seed: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:

        async def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < until:
                await one_request(client, url, rng, tally)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


# -- faults ----------------------------------------------------------------------------------


async def set_knobs(client: httpx.AsyncClient, sim: Sim, **knobs: Any) -> bool:
    try:
        r = await client.post(f"{sim.url}/_sim/knobs", json=knobs, timeout=5)
    except httpx.HTTPError:
        return False  # the simulator is down (killed on purpose); nothing to set
    return r.status_code == 200


LATENCY: dict[str, dict[str, float]] = {  # small, as a real server has: many overlapping requests
    "prefill": {"prefill_delay_per_token": 0.0005},
    "decode": {"itl": 0.004, "ttft": 0.01},
}
KNOBS_OFF = {"fail_next": 0, "hang": False, "slow_headers": 0.0, "health_fail": False,
             "reset_after_events": 0}


async def faults(sims: list[Sim], until: float, kill_at: float, faults_done: Counter[str], seed: int) -> None:
    """Inject one fault every ~2 s, and kill-and-restart one decode once, at `kill_at`."""
    rng = random.Random(seed)
    decodes = [s for s in sims if s.role == "decode"]
    killed = False
    async with httpx.AsyncClient() as client:
        while time.monotonic() < until - 3:
            if not killed and time.monotonic() >= kill_at:
                killed = True
                victim = decodes[0]
                os.kill(victim.proc.pid, signal.SIGKILL)
                victim.proc.popen.wait(5)  # type: ignore[union-attr]
                faults_done["SIGKILL decode"] += 1
                await asyncio.sleep(2.0)
                try:
                    await asyncio.to_thread(victim.start)
                except RuntimeError as exc:
                    print(f"restart of {victim.proc.name} failed: {exc}", file=sys.stderr)
                    faults_done["restart FAILED"] += 1
                    continue
                await set_knobs(client, victim, **LATENCY["decode"])
                faults_done["restart decode on the same port"] += 1
                continue
            fault = rng.choice(["fail500", "fail400", "reset", "slow", "hang", "flap"])
            sim = rng.choice(decodes if fault == "reset" else sims)
            if fault == "fail500":
                await set_knobs(client, sim, fail_next=rng.randint(1, 4), fail_status=500)
                await asyncio.sleep(0.5)
            elif fault == "fail400":
                await set_knobs(client, sim, fail_next=rng.randint(1, 2), fail_status=400)
                await asyncio.sleep(0.5)
            elif fault == "reset":
                await set_knobs(client, sim, reset_after_events=rng.randint(1, 4))
                await asyncio.sleep(0.5)
                await set_knobs(client, sim, reset_after_events=0)
            elif fault == "slow":
                await set_knobs(client, sim, slow_headers=0.5)
                await asyncio.sleep(1.0)
                await set_knobs(client, sim, slow_headers=0.0)
            elif fault == "hang":
                await set_knobs(client, sim, hang=True)
                await asyncio.sleep(0.3)
                await set_knobs(client, sim, hang=False)
            else:
                for _ in range(rng.randint(2, 5)):
                    await set_knobs(client, sim, health_fail=True)
                    await asyncio.sleep(rng.uniform(0.1, 0.8))
                    await set_knobs(client, sim, health_fail=False)
                    await asyncio.sleep(rng.uniform(0.1, 0.8))
            faults_done[f"{fault} on {sim.role}"] += 1
            await set_knobs(client, sim, fail_next=0)  # unused failures must not outlive the fault
            await asyncio.sleep(rng.uniform(1.0, 2.5))
        for sim in sims:
            await set_knobs(client, sim, **KNOBS_OFF)


# -- the run ---------------------------------------------------------------------------------


def worker_memory(pids: list[int], known: dict[int, int | None] | None = None) -> str:
    rss = {pid: (known or {}).get(pid) or rss_kib(pid) or 0 for pid in pids}
    return ", ".join(f"{pid}: {kib / 1024:.1f} MiB" for pid, kib in rss.items())


async def progress(tally: Tally, lb: Proc, start: float, until: float) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(min(PROGRESS_EVERY, max(0.0, until - time.monotonic())))
        elapsed = time.monotonic() - start
        print(f"[{elapsed:6.0f} s] sent {tally.sent}, ok {tally.ok}, "
              f"errors {sum(tally.errors.values())} {dict(tally.errors)}, lost {sum(tally.lost.values())}, "
              f"{tally.sent / max(elapsed, 1e-9):.0f} req/s, workers RSS {worker_memory(children(lb.pid))}",
              flush=True)


async def run(args: argparse.Namespace, sims: list[Sim], lb: Proc, url: str) -> tuple[Tally, Counter[str]]:
    tally = Tally()
    faults_done: Counter[str] = Counter()
    start = time.monotonic()
    until = start + args.minutes * 60
    kill_at = start + args.minutes * 60 * 0.4
    await asyncio.gather(
        load(url, args.concurrency, until, tally, args.seed),
        faults(sims, until, kill_at, faults_done, args.seed),
        progress(tally, lb, start, until),
    )
    return tally, faults_done


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM as Ctrl-C: asyncio.run turns SIGINT into a clean cancellation of the load.
    signal.raise_signal(signal.SIGINT)


def start_time(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot): tells a PID from its reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run the load [10]")
    parser.add_argument("--concurrency", type=int, default=32, help="clients at once [32]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix and the faults [1]")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs even on success")
    args = parser.parse_args()

    logs = Path(tempfile.mkdtemp(prefix="minilb-soak-"))
    sims = [Sim.make("prefill", logs, i) for i in range(2)] + [Sim.make("decode", logs, i) for i in range(2)]
    lb: Proc | None = None
    lost = 0
    previous = signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        for sim in sims:
            sim.start()
        for sim in sims:
            httpx.post(f"{sim.url}/_sim/knobs", json=LATENCY[sim.role], timeout=5).raise_for_status()
        lb, port = start_balancer([s for s in sims if s.role == "prefill"],
                                  [s for s in sims if s.role == "decode"], logs)
        url = f"http://{HOST}:{port}"
        workers_start = children(lb.pid)
        rss_start = {pid: rss_kib(pid) for pid in workers_start}
        fds_start = {pid: open_fds(pid) for pid in workers_start}
        print(f"soak: {args.minutes:g} min at concurrency {args.concurrency}; minilb {url} (master {lb.pid}, "
              f"workers {workers_start}); logs in {logs}", flush=True)
        print(f"workers RSS at start: {worker_memory(workers_start)}", flush=True)
        t0 = time.monotonic()
        tally, faults_done = asyncio.run(run(args, sims, lb, url))
        duration = time.monotonic() - t0

        # Let the last retries and health probes settle, then look at what is left behind.
        time.sleep(1.0)
        in_flight = {}
        for sim in sims:
            try:
                in_flight[sim.proc.name] = httpx.get(f"{sim.url}/_sim/stats", timeout=5).json()["in_flight"]
            except httpx.HTTPError as exc:
                in_flight[sim.proc.name] = f"unreachable: {exc}"
        workers_end = children(lb.pid)
        health = httpx.get(f"{url}/workers", timeout=5).json()["workers"]

        lost = sum(tally.lost.values())
        print("\n== soak summary ==")
        print(f"duration: {duration:.0f} s, concurrency {args.concurrency}, seed {args.seed}")
        print(f"requests sent: {tally.sent} ({tally.sent / duration:.0f}/s); complete answers: {tally.ok}")
        print(f"mix: {dict(sorted(tally.kinds.items()))}")
        print(f"explicit errors: {sum(tally.errors.values())} {dict(sorted(tally.errors.items()))}")
        print(f"requests lost: {lost} {dict(tally.lost)}")
        for example in tally.lost_examples:
            print(f"  lost: {example}")
        print(f"protocol violations (answered, but wrongly): {dict(tally.violations) or 0}")
        print(f"faults injected: {dict(sorted(faults_done.items()))}")
        print(f"workers RSS at start: {worker_memory(list(rss_start), rss_start)}")
        print(f"workers RSS at end:   {worker_memory(workers_end)}")
        print(f"workers fds start/end: "
              f"{', '.join(f'{p}: {fds_start.get(p)}/{open_fds(p)}' for p in workers_end)}")
        if workers_end != workers_start:
            print(f"WORKERS CHANGED: {workers_start} -> {workers_end} (a worker died and was replaced)")
        print(f"server in_flight at end: {in_flight}")
        print(f"server health at end: {[(w['role'], w['url'], w['healthy']) for w in health]}")
        tracebacks = lb.output().count("Traceback")
        print(f"tracebacks in minilb's log: {tracebacks}")
        alive = lb.alive()
        print(f"minilb alive at end: {alive}")
        failed = lost > 0 or not alive
        print("RESULT:", "FAIL" if failed else "PASS", "(requests lost)" if lost else "")
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        lost = -1
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lb is not None:
            workers = {pid: start_time(pid) for pid in children(lb.pid)} if lb.alive() else {}
            lb.stop(signal.SIGINT, wait=15)  # Gunicorn's quick shutdown
            for pid, started in workers.items():  # in case the master went before its workers
                if started is not None and start_time(pid) == started:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for sim in sims:
            sim.proc.stop()
        if lost == 0 and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"logs kept in {logs}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
