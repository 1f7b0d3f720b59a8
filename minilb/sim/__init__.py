"""A simulator of SGLang prefill and decode servers, for tests and benchmarks.

Pairing is real: the decode contacts the prefill's bootstrap listener over
loopback HTTP and both meet by `bootstrap_room`, so a balancer that sends
the wrong room, host or port fails here just as it would against SGLang.
"""

from minilb.sim.app import SimApp, create_sim_app
from minilb.sim.knobs import Knobs, SimConfig

__all__ = ["Knobs", "SimApp", "SimConfig", "create_sim_app"]
