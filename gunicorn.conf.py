# Gunicorn settings for `gunicorn -c gunicorn.conf.py minilb.app:app`: the same ones
# `minilb serve` uses. minilb's own settings come from the TOML file in MINILB_CONFIG.
import os

from minilb import config as _config
from minilb.serve import gunicorn_options as _options

_cfg = _config.from_env()
os.environ[_config.CONFIG_JSON_ENV] = _cfg.to_json()  # workers reuse the validated config

globals().update(_options(_cfg))  # bind, workers, worker_class, timeouts and the hooks
bind = os.environ.get("MINILB_BIND", bind)  # noqa: F821  (set just above)
workers = int(os.environ.get("MINILB_WORKERS", workers))  # noqa: F821
