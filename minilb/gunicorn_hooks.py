"""Gunicorn server hooks and worker class; `gunicorn.conf.py` and `minilb serve` use them.

The one module-level variable here is the hand-off across fork: the master
creates the shared state in `on_starting`, and every worker forked later,
first or replacement, finds it in its copy of this module.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from minilb.shared import SharedState

_inherited: SharedState | None = None

# How long a retiring worker keeps reading connections it had already accepted.
_DRAIN_SECONDS = 0.25


class _DrainingServer(Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        # A connection accepted just before the signal may hold a request that was not
        # read yet; uvicorn would close it as idle and the client would see a reset.
        await asyncio.sleep(_DRAIN_SECONDS)
        await super().shutdown(sockets)


class Worker(UvicornWorker):  # type: ignore[misc]
    """uvicorn's worker with uvloop and httptools, and a shutdown that drops no request."""

    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools", "lifespan": "on"}

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = _DrainingServer(config=self.config)
        # Gunicorn's quick shutdown (SIGINT or SIGQUIT to the master) sends SIGQUIT;
        # uvicorn_worker's handler only flags the Gunicorn worker, so the server kept
        # running until the master's SIGKILL. Stop the server itself, at once.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, _quick_exit, server)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


def _quick_exit(server: Server) -> None:
    server.should_exit = True
    server.force_exit = True


def inherited_state() -> SharedState | None:
    return _inherited


def on_starting(server: Any) -> None:
    global _inherited
    _inherited = SharedState()
    logging.getLogger("minilb").info(
        "shared state ready (%s)", "lock-free atomics" if _inherited.lock_free else "fcntl lock"
    )
