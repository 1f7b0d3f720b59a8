#!/usr/bin/env python3
"""Side-by-side benchmark: minilb vs. SGLang's Rust router vs. SGLang's Python mini_lb.

All balancers run in turn, interleaved over several rounds, against the same two
simulator processes (1 prefill, 1 decode, no latency knobs). Each balancer is
pinned to core 0; wrk, the simulators and this script run on core 1.

Scenarios (each for --duration seconds per balancer per round):
  nonstream  wrk, POST /generate, max_new_tokens 16, 64 connections
  stream     wrk, POST /generate stream, 50 events per response, 32 connections
  c1         one connection from a small Python client, one request at a time;
             the same client also measures a direct baseline (the body with
             bootstrap fields sent to prefill and decode at once, as a balancer
             does), and "added latency" is balancer p50 minus direct p50.

Per balancer and scenario: requests/s, p50/p99 latency, errors (non-2xx and
socket errors), CPU microseconds per request of the balancer's whole process
tree (utime + stime from /proc), RSS per worker at idle and after the round.

    .venv/bin/python scripts/bench_peers.py                 # 3 rounds of 10 s
    .venv/bin/python scripts/bench_peers.py --rounds 1 --duration 3
    .venv/bin/python scripts/bench_peers.py --backend fast  # scripts/fast_backend.py instead

With `minilb sim` as the backend, wrk and the simulators fill their core before
a fast balancer fills its own; `--backend fast` swaps in a stand-in server that
costs a fraction as much (no pairing), so the balancers' own limits show.

The benchmark-only tools (sglang-router 0.3.2 in .bench/venv, wrk from apt)
are installed on first use and stay out of the test suite.
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
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTER_VERSION = "0.3.2"
LB_CORE, LOAD_CORE = "0", "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
HOST = "127.0.0.1"
BALANCERS = ("minilb", "rust", "mini_lb")
SCENARIOS = ("nonstream", "stream", "c1")
MINILB = [sys.executable, "-m", "minilb"]
PROMPT = "The quick brown fox jumps over the lazy dog, " * 4

# wrk prints one JSON line at the end (latency in microseconds).
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %s

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- processes


class Processes:
    """Everything this script started, stopped by PID (descendants too) on exit."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self.minilb_env: dict[str, str] | None = None  # set by --minilb-ref

    def start(
        self, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        family = [proc.pid, *descendants(proc.pid)]
        for pid in family:
            _signal(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for pid in family:
            _signal(pid, signal.SIGKILL)  # no-op for those already gone
        proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def descendants(root: int) -> list[int]:
    """PIDs of every live descendant of `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def tree_cpu_us(root: int) -> float:
    return sum(cpu_ticks(pid) for pid in [root, *descendants(root)]) * 1e6 / CLK_TCK


def rss_kb(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    except OSError:
        return 0


def worker_rss_mb(root: int) -> list[float]:
    """RSS of each worker: the tree's leaf processes (Gunicorn's workers, or the process)."""
    tree = [root, *descendants(root)]
    leaves = [pid for pid in tree if not descendants(pid)]
    return [round(rss_kb(pid) / 1024, 1) for pid in leaves]


# ---------------------------------------------------------------- setup


def free_port() -> int:
    """A free port below the ephemeral range, so no outgoing connection (mini_lb opens
    thousands) can take it between this check and the server's bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("found no free port below the ephemeral range")


def ensure_router_venv(venv: Path) -> Path:
    """A venv with sglang-router from PyPI; returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('sglang-router'))"]
    found = subprocess.run(probe, capture_output=True, text=True)
    if found.returncode != 0 or found.stdout.strip() != ROUTER_VERSION:
        log(f"installing sglang-router=={ROUTER_VERSION} into {venv}")
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"sglang-router=={ROUTER_VERSION}"], check=True
        )
    return python


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        log("installing wrk with apt-get")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
        wrk = shutil.which("wrk")
        if wrk is None:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
            wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not available and could not be installed")
    return wrk


def has_mini_lb(router_python: Path) -> bool:
    probe = [str(router_python), "-c", "import sglang_router.mini_lb"]
    return subprocess.run(probe, capture_output=True).returncode == 0


# ---------------------------------------------------------------- HTTP helpers


def wait_http(url: str, proc: subprocess.Popen[bytes], body: bytes | None, timeout: float) -> None:
    """Until `url` answers 200 (a POST when `body` is given), or fail if the process died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}, method="POST" if body else "GET"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    response.read()
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s ({last})")


def generate_body(max_new_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "text": PROMPT,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0},
        "stream": stream,
    }


# ---------------------------------------------------------------- the c=1 client


async def _http_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes
) -> int:
    """One keep-alive POST; returns the status once the whole response has arrived."""
    import httptools

    done = asyncio.get_running_loop().create_future()

    class _Sink:
        def on_message_complete(self) -> None:
            done.set_result(None)

    parser = httptools.HttpResponseParser(_Sink())
    writer.write(head + body)
    while not done.done():
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("connection closed mid-response")
        parser.feed_data(data)
    return int(parser.get_status_code())


def _head(path: str, port: int, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def _latency_loop(
    ports: list[int], make_body: Callable[[], bytes], duration: float
) -> tuple[list[float], int]:
    """Sequential requests, each sent to every port at once; latencies in µs, errors."""
    conns = [await asyncio.open_connection(HOST, port) for port in ports]
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    try:
        while time.perf_counter() < deadline:
            body = make_body()
            head = [_head("/generate", port, len(body)) for port in ports]
            started = time.perf_counter_ns()
            statuses = await asyncio.gather(
                *(_http_exchange(r, w, h, body) for (r, w), h in zip(conns, head, strict=True))
            )
            elapsed = (time.perf_counter_ns() - started) / 1000
            if all(s == 200 for s in statuses):
                latencies.append(elapsed)
            else:
                errors += 1
    finally:
        for _, writer in conns:
            writer.close()
    return latencies, errors


def latency_run(ports: list[int], make_body: Callable[[], bytes], duration: float) -> dict[str, float]:
    try:
        import uvloop

        runner: Callable[..., tuple[list[float], int]] = uvloop.run
    except ImportError:
        runner = asyncio.run
    latencies, errors = runner(_latency_loop(ports, make_body, duration))
    latencies.sort()
    return {
        "requests": len(latencies) + errors,
        "rps": (len(latencies) + errors) / duration,
        "p50_us": percentile(latencies, 50),
        "p99_us": percentile(latencies, 99),
        "errors": errors,
    }


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


# ---------------------------------------------------------------- one measurement


@dataclass
class Result:
    balancer: str
    scenario: str
    round: int
    requests: int
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    cpu_us_per_req: float
    cpu_pct: float = float("nan")  # of one core: near 100 means the balancer is the bottleneck
    rss_idle_mb: list[float] = field(default_factory=list)
    rss_after_mb: list[float] = field(default_factory=list)


def run_wrk(wrk: str, lua: Path, url: str, connections: int, duration: float) -> dict[str, float]:
    argv = [
        "taskset", "-c", LOAD_CORE, wrk, "-t1", f"-c{connections}", f"-d{duration:g}s",
        "--timeout", "10s", "-s", str(lua), url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line.removeprefix("WRKJSON "))
            seconds = raw["duration_us"] / 1e6
            errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
            return {
                "requests": raw["requests"], "rps": raw["requests"] / seconds,
                "p50_us": raw["p50_us"], "p99_us": raw["p99_us"], "errors": errors,
            }
    raise RuntimeError(f"wrk printed no summary: {out.stdout[-500:]} {out.stderr[-500:]}")


def write_lua(directory: Path, name: str, body: dict[str, object]) -> Path:
    path = directory / f"{name}.lua"
    path.write_text(WRK_LUA % json.dumps(json.dumps(body)))
    return path


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Processes
    workdir: Path
    wrk: str
    router_python: Path
    prefill_port: int
    bootstrap_port: int
    decode_port: int
    lua: dict[str, Path]
    results: list[Result] = field(default_factory=list)

    def balancer_argv(self, name: str, port: int) -> list[str]:
        prefill = f"http://{HOST}:{self.prefill_port}"
        decode = f"http://{HOST}:{self.decode_port}"
        pin = ["taskset", "-c", LB_CORE]
        if name == "minilb":
            return [*pin, *MINILB, "serve", "--host", HOST, "--port", str(port), "--workers", "1",
                    "--log-level", "warning", "--prefill", f"{prefill} {self.bootstrap_port}",
                    "--decode", decode]
        common = ["--pd-disaggregation", "--prefill", prefill, str(self.bootstrap_port),
                  "--decode", decode, "--policy", "round_robin", "--host", HOST, "--port", str(port)]
        launch = [*pin, str(self.router_python), "-m", "sglang_router.launch_router"]
        if name == "rust":
            return [*launch, *common, "--log-level", "warn"]
        return [*launch, "--mini-lb", *common]

    def measure(self, name: str, root: int, port: int, scenario: str, rnd: int) -> Result:
        duration = self.args.duration
        before, started = tree_cpu_us(root), time.monotonic()
        if scenario == "c1":
            body = json.dumps(generate_body(16, False)).encode()
            stats = latency_run([port], lambda: body, duration)
        else:
            connections = 64 if scenario == "nonstream" else 32
            stats = run_wrk(self.wrk, self.lua[scenario], f"http://{HOST}:{port}/generate",
                            connections, duration)
        cpu = tree_cpu_us(root) - before
        wall_us = (time.monotonic() - started) * 1e6
        requests = int(stats["requests"])
        return Result(
            balancer=name, scenario=scenario, round=rnd, requests=requests, rps=stats["rps"],
            p50_us=stats["p50_us"], p99_us=stats["p99_us"], errors=int(stats["errors"]),
            cpu_us_per_req=cpu / requests if requests else float("nan"), cpu_pct=100 * cpu / wall_us,
        )

    def start_balancer(self, name: str, rnd: int) -> tuple[subprocess.Popen[bytes], int] | None:
        """Start and wait for one balancer; a second try on a new port, else None."""
        body = json.dumps(generate_body(4, False)).encode()
        for attempt in (1, 2):
            port = free_port()
            log_path = self.workdir / f"{name}-{rnd}-{attempt}.log"
            env = self.procs.minilb_env if name == "minilb" else None
            proc = self.procs.start(self.balancer_argv(name, port), log_path, env)
            try:
                wait_http(f"http://{HOST}:{port}/generate", proc, body, timeout=60)
                return proc, port
            except RuntimeError as exc:
                tail = log_path.read_text(errors="replace")[-1500:]
                log(f"round {rnd} {name} did not start (try {attempt}): {exc}\n{tail}")
                self.procs.stop(proc)
        log(f"round {rnd}: skipping {name}")
        return None

    def run_balancer(self, name: str, rnd: int) -> None:
        started = self.start_balancer(name, rnd)
        if started is None:
            return
        proc, port = started
        try:
            time.sleep(0.5)
            idle = worker_rss_mb(proc.pid)
            if self.args.warmup > 0:
                run_wrk(self.wrk, self.lua["nonstream"], f"http://{HOST}:{port}/generate", 64,
                        self.args.warmup)
            round_results = []
            for scenario in self.args.scenarios:
                try:
                    result = self.measure(name, proc.pid, port, scenario, rnd)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                    log(f"round {rnd} {name} {scenario} failed: {exc}")
                    continue
                round_results.append(result)
                log(f"round {rnd} {name:8} {scenario:9} {result.rps:8.0f} req/s  "
                    f"p50 {result.p50_us / 1000:7.2f} ms  p99 {result.p99_us / 1000:7.2f} ms  "
                    f"errors {result.errors:5}  CPU {result.cpu_us_per_req:6.0f} µs/req "
                    f"({result.cpu_pct:3.0f}% of a core)")
            after = worker_rss_mb(proc.pid)
            for result in round_results:
                result.rss_idle_mb, result.rss_after_mb = idle, after
            self.results.extend(round_results)
        finally:
            self.procs.stop(proc)

    def run_direct(self, rnd: int) -> None:
        """The c=1 baseline with no balancer: the client pairs the two requests itself."""
        rng = random.Random()
        template = generate_body(16, False)

        def body() -> bytes:
            patched = {**template, "bootstrap_host": HOST, "bootstrap_port": self.bootstrap_port,
                       "bootstrap_room": rng.getrandbits(63)}
            return json.dumps(patched).encode()

        stats = latency_run([self.prefill_port, self.decode_port], body, self.args.duration)
        self.results.append(Result(
            balancer="direct", scenario="c1", round=rnd, requests=int(stats["requests"]),
            rps=stats["rps"], p50_us=stats["p50_us"], p99_us=stats["p99_us"],
            errors=int(stats["errors"]), cpu_us_per_req=float("nan"),
        ))
        log(f"round {rnd} direct   c1        p50 {stats['p50_us'] / 1000:7.3f} ms  "
            f"errors {stats['errors']}")


# ---------------------------------------------------------------- report


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def summarize(results: list[Result]) -> dict[tuple[str, str], dict[str, float]]:
    """Median over rounds of each figure, per (balancer, scenario); errors are summed."""
    grouped: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        grouped.setdefault((r.balancer, r.scenario), []).append(r)
    summary: dict[tuple[str, str], dict[str, float]] = {}
    for key, rows in grouped.items():
        summary[key] = {
            "rps": median([r.rps for r in rows]),
            "p50_us": median([r.p50_us for r in rows]),
            "p99_us": median([r.p99_us for r in rows]),
            "errors": sum(r.errors for r in rows),
            "cpu": median([r.cpu_us_per_req for r in rows]),
            "cpu_pct": median([r.cpu_pct for r in rows]),
            "rss_idle": median([max(r.rss_idle_mb, default=float("nan")) for r in rows]),
            "rss_after": median([max(r.rss_after_mb, default=float("nan")) for r in rows]),
        }
    direct = summary.get(("direct", "c1"))
    for (balancer, scenario), row in summary.items():
        if scenario == "c1" and balancer != "direct" and direct is not None:
            row["added_us"] = row["p50_us"] - direct["p50_us"]
    return summary


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return "-" if a != a or b != b or b == 0 else f"{a / b:.2f}x"


def markdown(summary: dict[tuple[str, str], dict[str, float]], balancers: list[str]) -> str:
    lines = [
        "| balancer | scenario | req/s | p50 ms | p99 ms | errors | CPU µs/req | core busy "
        "| added p50 µs (c=1) | RSS/worker idle MB | RSS/worker after MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in SCENARIOS:
        for balancer in [*balancers, "direct"]:
            row = summary.get((balancer, scenario))
            if row is None:
                continue
            lines.append(
                f"| {balancer} | {scenario} | {_fmt(row['rps'])} | {_fmt(row['p50_us'] / 1000, 2)} "
                f"| {_fmt(row['p99_us'] / 1000, 2)} | {int(row['errors'])} | {_fmt(row['cpu'])} "
                f"| {_fmt(row['cpu_pct'])}{'%' if row['cpu_pct'] == row['cpu_pct'] else ''} "
                f"| {_fmt(row.get('added_us', float('nan')))} | {_fmt(row['rss_idle'], 1)} "
                f"| {_fmt(row['rss_after'], 1)} |"
            )
    lines += ["", *ratio_lines(summary, balancers)]
    return "\n".join(lines)


def ratio_lines(summary: dict[tuple[str, str], dict[str, float]], balancers: list[str]) -> list[str]:
    peers = [p for p in ("rust", "mini_lb") if p in balancers]
    if "minilb" not in balancers or not peers:
        return []
    header = "| scenario | figure | " + " | ".join(f"minilb / {p}" for p in peers) + " |"
    lines = [header, "|---|---|" + "---:|" * len(peers)]
    figures = [("req/s", "rps"), ("CPU µs/req", "cpu"), ("p50", "p50_us"), ("p99", "p99_us")]
    for scenario in SCENARIOS:
        mine = summary.get(("minilb", scenario))
        if mine is None:
            continue
        rows = [*figures, ("added p50 (c=1)", "added_us")] if scenario == "c1" else figures
        for label, key in rows:
            cells = []
            for peer in peers:
                other = summary.get((peer, scenario), {})
                cells.append(_ratio(mine.get(key, float("nan")), other.get(key, float("nan"))))
            lines.append(f"| {scenario} | {label} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per start (default 2)")
    parser.add_argument("--balancers", default=",".join(BALANCERS),
                        help="comma-separated subset of minilb,rust,mini_lb")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of nonstream,stream,c1")
    parser.add_argument("--bench-dir", type=Path, default=ROOT / ".bench",
                        help="where the router venv lives (default .bench)")
    parser.add_argument("--minilb-ref", default=None,
                        help="benchmark minilb (and run the simulators) as committed at this git "
                             "ref, e.g. HEAD, instead of the working tree")
    parser.add_argument("--backend", choices=("sim", "fast"), default="sim",
                        help="sim: `minilb sim` prefill and decode (default); fast: the stand-in "
                             "scripts/fast_backend.py, cheap enough that the balancer's core fills first")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_peers.md",
                        help="markdown report (raw rounds go beside it as .json)")
    args = parser.parse_args()
    args.balancers = _choices(args.balancers, BALANCERS, "--balancers")
    args.scenarios = _choices(args.scenarios, SCENARIOS, "--scenarios")
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    return args


def _choices(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{flag} {value!r}: expected a comma-separated subset of {','.join(allowed)}")
    return chosen


def export_minilb(ref: str, workdir: Path) -> dict[str, str]:
    """Check out the `minilb` package of a git ref into `workdir` (read-only `git archive`)
    and return an environment that imports it before the editable install."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "minilb"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref],
                            capture_output=True, text=True, check=True).stdout.strip()
    log(f"minilb and its simulators run from {ref} ({commit})")
    return {**os.environ, "PYTHONPATH": str(workdir)}


def start_simulators(procs: Processes, workdir: Path, backend: str) -> tuple[int, int, int]:
    prefill, bootstrap, decode = free_port(), free_port(), free_port()
    pin = ["taskset", "-c", LOAD_CORE]
    if backend == "fast":
        # One process, both roles; it does no pairing, so nothing listens on `bootstrap`.
        argv = [*pin, sys.executable, str(ROOT / "scripts" / "fast_backend.py"), "--host", HOST,
                "--prefill-port", str(prefill), "--decode-port", str(decode)]
        proc = procs.start(argv, workdir / "fast-backend.log")
        for port in (prefill, decode):
            wait_http(f"http://{HOST}:{port}/health", proc, None, timeout=30)
        return prefill, bootstrap, decode
    for role, port, extra in (("prefill", prefill, ["--bootstrap-port", str(bootstrap)]),
                              ("decode", decode, [])):
        argv = [*pin, *MINILB, "sim", "--role", role, "--host", HOST, "--port", str(port), *extra]
        proc = procs.start(argv, workdir / f"sim-{role}.log", procs.minilb_env)
        wait_http(f"http://{HOST}:{port}/health", proc, None, timeout=30)
    return prefill, bootstrap, decode


def main() -> int:
    args = parse_args()
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # this script's own client runs beside wrk
    procs = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args, procs)
    except KeyboardInterrupt:
        log("interrupted; stopping everything started")
        return 130
    finally:
        procs.stop_all()


def run(args: argparse.Namespace, procs: Processes) -> int:
    wrk = ensure_wrk()
    router_python = ensure_router_venv(args.bench_dir / "venv")
    if "mini_lb" in args.balancers and not has_mini_lb(router_python):
        log(f"sglang-router {ROUTER_VERSION} does not ship sglang_router.mini_lb; skipping mini_lb")
        args.balancers.remove("mini_lb")
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        workdir = Path(tmp)
        lua = {"nonstream": write_lua(workdir, "nonstream", generate_body(16, False)),
               "stream": write_lua(workdir, "stream", generate_body(50, True))}
        if args.minilb_ref:
            procs.minilb_env = export_minilb(args.minilb_ref, workdir)
        ports = start_simulators(procs, workdir, args.backend)
        what = "simulators" if args.backend == "sim" else "fast backend"
        log(f"{what}: prefill :{ports[0]} (bootstrap :{ports[1]}), decode :{ports[2]}")
        bench = Bench(args, procs, workdir, wrk, router_python, *ports, lua=lua)
        for rnd in range(1, args.rounds + 1):
            order = list(args.balancers)
            if rnd % 2 == 0:
                order.reverse()  # so no balancer always runs first after the simulators idled
            for name in order:
                bench.run_balancer(name, rnd)
            if "c1" in args.scenarios:
                bench.run_direct(rnd)
        report = markdown(summarize(bench.results), args.balancers)
    source = f"minilb from {args.minilb_ref}" if args.minilb_ref else "minilb from the working tree"
    backend = "minilb sim" if args.backend == "sim" else "scripts/fast_backend.py"
    header = (f"{source}; backend {backend}; {args.rounds} round(s) x {args.duration:g} s per scenario; "
              f"medians over rounds; balancer on core {LB_CORE}, wrk + backend on core {LOAD_CORE}")
    print(f"\n{header}\n\n{report}\n", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"{header}\n\n{report}\n")
    args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in bench.results], indent=1))
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
