"""Run a simulator: uvicorn (uvloop + httptools) plus the bootstrap listener, one loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from minilb.sim.app import SimApp, create_sim_app
from minilb.sim.generation import SimulatedReset
from minilb.sim.knobs import SimConfig
from minilb.sim.stats import Stats


class _HideSimulatedResets(logging.Filter):
    """The reset fault raises on purpose; uvicorn need not print its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedReset))


def _counting_protocol(stats: Stats) -> type[HttpToolsProtocol]:
    class CountingProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            stats.connections_opened += 1
            super().connection_made(transport)

    return CountingProtocol


def ready_line(config: SimConfig) -> str:
    line = f"minilb-sim ready role={config.role} port={config.port}"
    if config.role == "prefill":
        line += f" bootstrap_port={config.bootstrap_port}"
    return line


async def serve(app: SimApp) -> None:
    config = app.config
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="none",
            http=_counting_protocol(app.stats),
            lifespan="on",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
    )

    async def announce() -> None:
        # server.started is set once lifespan startup (the bootstrap listener)
        # finished and the HTTP socket listens.
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        print(ready_line(config), flush=True)

    announcer = asyncio.ensure_future(announce())
    try:
        await server.serve()
    finally:
        announcer.cancel()
    if not server.started:
        raise SystemExit(1)


def run(config: SimConfig) -> None:
    """Serve until SIGTERM or SIGINT, then exit with status 0."""
    import uvloop

    logging.getLogger("uvicorn.error").addFilter(_HideSimulatedResets())
    # uvicorn re-raises the signal it caught once it has shut down; a no-op
    # handler makes that re-raise harmless so the process exits with 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    app = create_sim_app(config)
    try:
        uvloop.run(serve(app))
    except SystemExit:
        raise
    sys.stdout.flush()
