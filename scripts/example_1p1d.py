"""A basic one-prefill, one-decode minilb, configured in Python.

    python scripts/example_1p1d.py --prefill http://127.0.0.1:30000 --bootstrap-port 30001 \
        --decode http://127.0.0.1:31000
"""

from __future__ import annotations

import argparse

from minilb import config
from minilb.serve import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", default="http://127.0.0.1:30000")
    parser.add_argument("--bootstrap-port", type=int, default=30001)
    parser.add_argument("--decode", default="http://127.0.0.1:31000")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    cfg = config.build(
        host="127.0.0.1",
        port=args.port,
        prefill=[{"url": args.prefill, "bootstrap_port": args.bootstrap_port}],
        decode=[{"url": args.decode}],
    )
    run(cfg)


if __name__ == "__main__":
    main()
