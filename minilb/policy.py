"""Pair selection policies: pure functions of a ticket, tested without processes."""

from __future__ import annotations

import math
import random
from typing import Protocol

from minilb.config import Policy


class Ticketing(Protocol):
    def next(self) -> int: ...


def round_robin_pair(ticket: int, n_prefill: int, n_decode: int) -> tuple[int, int]:
    """Map a ticket to (prefill index, decode index) in one global round-robin order.

    Prefill is `ticket % P`. Decode is `ticket % D`, shifted by one more after
    each block of lcm(P, D) tickets, for gcd(P, D) blocks: the order repeats
    every P*D tickets and each P*D consecutive tickets hold every pair once.
    When P and D share no factor the shift is always zero.
    """
    block = math.lcm(n_prefill, n_decode)
    shift = (ticket // block) % math.gcd(n_prefill, n_decode)
    return ticket % n_prefill, (ticket + shift) % n_decode


class RoundRobin:
    name = "round_robin"

    def __init__(self, tickets: Ticketing) -> None:
        self._tickets = tickets

    def pick(self, n_prefill: int, n_decode: int) -> tuple[int, int]:
        return round_robin_pair(self._tickets.next(), n_prefill, n_decode)


class Random:
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, n_prefill: int, n_decode: int) -> tuple[int, int]:
        return self._rng.randrange(n_prefill), self._rng.randrange(n_decode)


Selector = RoundRobin | Random


def make_selector(policy: Policy, tickets: Ticketing, rng: random.Random) -> Selector:
    if policy == "random":
        return Random(rng)
    return RoundRobin(tickets)
