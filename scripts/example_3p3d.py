"""A custom three-prefill, three-decode minilb with four workers, configured in Python.

Prefill i listens on 30000+i with its bootstrap listener on 30100+i; decode i on 31000+i.
Every 9 consecutive requests use each of the 9 (prefill, decode) pairs exactly once.

    python scripts/example_3p3d.py --host 10.0.0.1
"""

from __future__ import annotations

import argparse

from minilb import config
from minilb.serve import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="where the servers run")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--check", action="store_true", help="validate and print, do not serve")
    args = parser.parse_args()
    cfg = config.build(
        host="127.0.0.1",
        port=args.port,
        workers=4,
        policy="round_robin",
        timeout_secs=600,
        prefill=[
            {"url": f"http://{args.host}:{30000 + i}", "bootstrap_port": 30100 + i} for i in range(3)
        ],
        decode=[{"url": f"http://{args.host}:{31000 + i}"} for i in range(3)],
    )
    if args.check:
        print(cfg.to_json())
        return
    run(cfg)


if __name__ == "__main__":
    main()
