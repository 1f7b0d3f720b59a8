"""Running the balancer under Gunicorn with uvicorn workers, from Python."""

from __future__ import annotations

import os
from typing import Any

from gunicorn.app.base import BaseApplication

from minilb import config as config_mod
from minilb import gunicorn_hooks as hooks
from minilb.config import Config


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gunicorn_options(config: Config) -> dict[str, Any]:
    """The settings `gunicorn.conf.py` also gives, for `minilb serve`."""
    return {
        "bind": bind_address(config.host, config.port),
        "workers": config.workers,
        "worker_class": "minilb.gunicorn_hooks.Worker",
        "keepalive": 75,
        "graceful_timeout": 30,
        "timeout": 60,
        "loglevel": config.log_level,
        "control_socket_disable": True,
        "on_starting": hooks.on_starting,
        "pre_fork": hooks.pre_fork,
        "post_fork": hooks.post_fork,
        "child_exit": hooks.child_exit,
    }


class GunicornApp(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: Config, extra: dict[str, Any] | None = None) -> None:
        self._options = {**gunicorn_options(config), **(extra or {})}
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from minilb.app import app

        return app


def run(config: Config, extra: dict[str, Any] | None = None) -> None:
    """Serve until stopped; workers receive `config` through the environment."""
    os.environ[config_mod.CONFIG_JSON_ENV] = config.to_json()
    GunicornApp(config, extra).run()
