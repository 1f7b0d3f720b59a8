"""Gunicorn server hooks; `gunicorn.conf.py` and `minilb serve` both use them.

The one module-level variable here is the hand-off across fork: the master
creates the shared state in `on_starting`, and every worker forked later,
first or replacement, finds it in its copy of this module.
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn_worker import UvicornWorker

from minilb.shared import SharedState

_inherited: SharedState | None = None


class Worker(UvicornWorker):  # type: ignore[misc]
    """uvicorn's worker with the fast loop and parser chosen explicitly."""

    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools", "lifespan": "on"}


def inherited_state() -> SharedState | None:
    return _inherited


def on_starting(server: Any) -> None:
    global _inherited
    _inherited = SharedState()
    logging.getLogger("minilb").info(
        "shared state ready (%s)", "lock-free atomics" if _inherited.lock_free else "fcntl lock"
    )
