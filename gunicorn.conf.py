# Gunicorn settings for `gunicorn -c gunicorn.conf.py minilb.app:app`.
# The balancer's own settings come from the TOML file named by MINILB_CONFIG.
import os

from minilb import config as _config
from minilb.gunicorn_hooks import child_exit, on_starting, post_fork, pre_fork  # noqa: F401

_cfg = _config.from_env()
os.environ[_config.CONFIG_JSON_ENV] = _cfg.to_json()  # workers reuse the validated config

bind = os.environ.get("MINILB_BIND", f"{_cfg.host}:{_cfg.port}")
workers = int(os.environ.get("MINILB_WORKERS", _cfg.workers))
worker_class = "minilb.gunicorn_hooks.Worker"
keepalive = 75
graceful_timeout = 30
timeout = 60
control_socket_disable = True  # a fixed default path collides between instances
