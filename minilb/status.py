"""`minilb status`: a live table of the servers behind a balancer, from its own endpoints."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from minilb.errors import MinilbError

_SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class StatusError(MinilbError):
    """The balancer could not be read."""


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Per-server samples from a /metrics page: {server URL: {metric name: value}}."""
    servers: dict[str, dict[str, float]] = defaultdict(dict)
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        server = labels.get("server")
        if server is None:
            continue
        name = match["name"]
        if name.endswith("_bucket"):
            continue
        servers[server][name] = float(match["value"])
    return servers


def fetch(url: str, admin_key: str | None) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        with httpx.Client(base_url=url, timeout=5, headers=headers) as client:
            workers = client.get("/workers")
            metrics = client.get("/metrics")
    except httpx.HTTPError as exc:
        raise StatusError(f"cannot reach {url}: {exc}") from None
    if workers.status_code != 200:
        raise StatusError(f"{url}/workers answered {workers.status_code}: {workers.text[:200]}")
    return workers.json()["workers"], parse_metrics(metrics.text if metrics.status_code == 200 else "")


def table(url: str, workers: list[dict[str, Any]], samples: dict[str, dict[str, float]]) -> Table:
    view = Table(title=f"minilb at {url}", title_justify="left")
    for column in ("role", "server", "health", "in flight", "requests", "errors", "avg response"):
        view.add_column(column, justify="right" if column not in ("role", "server", "health") else "left")
    for worker in workers:
        s = samples.get(worker["url"], {})
        count = s.get("minilb_upstream_response_seconds_count", 0.0)
        latency = s.get("minilb_upstream_response_seconds_sum", 0.0) / count if count else None
        view.add_row(
            worker["role"],
            worker["url"],
            "[green]healthy[/]" if worker["healthy"] else "[red]UNHEALTHY[/]",
            str(worker["in_flight"]),
            f"{s.get('minilb_upstream_requests_total', 0):.0f}",
            f"{s.get('minilb_upstream_errors_total', 0):.0f}",
            f"{latency * 1000:.1f} ms" if latency is not None else "-",
        )
    return view


def show(url: str, *, watch: bool, interval: float, admin_key: str | None) -> None:
    console = Console()
    url = url.rstrip("/")
    if not watch:
        console.print(table(url, *fetch(url, admin_key)))
        return
    with Live(table(url, *fetch(url, admin_key)), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(table(url, *fetch(url, admin_key)))
        except KeyboardInterrupt:
            return
