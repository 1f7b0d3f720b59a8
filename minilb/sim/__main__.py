"""`python -m minilb.sim ...`: the same as `minilb sim ...`."""

import typer

from minilb.sim.cli import sim

typer.run(sim)
