"""Gunicorn server hooks and worker class; `gunicorn.conf.py` and `minilb serve` use them.

The one module-level variable here, `_inherited`, is the hand-off across fork:
the master creates the shared state in `on_starting`, and every worker forked
later, first or replacement, finds it (and its slot) in its copy of this module.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from minilb import config
from minilb.admission import release_slot
from minilb.membership import Membership
from minilb.shared import MAX_WORKERS, SharedState

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

    # No proxy-headers middleware: minilb never reads the client's address, and the
    # middleware costs a call and a scope copy per request.
    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools", "lifespan": "on", "proxy_headers": False}

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


@dataclass
class _Inherited:
    state: SharedState | None = None
    slot: int = 0


_inherited = _Inherited()


def inherited() -> tuple[SharedState | None, int]:
    """The shared state the master made, and this worker's slot in it."""
    return _inherited.state, _inherited.slot


# Hooks that run in the master.


def on_starting(server: Any) -> None:
    state = SharedState()
    Membership(state).initialise(config.from_env())
    _inherited.state = state
    logging.getLogger("minilb").info(
        "shared state ready (%s)", "lock-free atomics" if state.lock_free else "fcntl lock"
    )


def pre_fork(server: Any, worker: Any) -> None:
    used = {getattr(w, "minilb_slot", None) for w in server.WORKERS.values()}
    worker.minilb_slot = next(i for i in range(MAX_WORKERS) if i not in used)


def child_exit(server: Any, worker: Any) -> None:
    if _inherited.state is not None:
        release_slot(_inherited.state, getattr(worker, "minilb_slot", 0))


# Hooks that run in the worker.


def post_fork(server: Any, worker: Any) -> None:
    _inherited.slot = getattr(worker, "minilb_slot", 0)
