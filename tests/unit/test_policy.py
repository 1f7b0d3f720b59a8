from __future__ import annotations

import random
from collections import Counter
from itertools import count

import pytest

from minilb.policy import Random, RoundRobin, make_selector, round_robin_pair


class FakeTickets:
    def __init__(self, start: int = 0) -> None:
        self._next = count(start)

    def next(self) -> int:
        return next(self._next)


@pytest.mark.parametrize("n_prefill", range(1, 7))
@pytest.mark.parametrize("n_decode", range(1, 7))
def test_every_window_of_p_times_d_tickets_holds_every_pair_once(n_prefill: int, n_decode: int) -> None:
    size = n_prefill * n_decode
    for start in range(0, 3 * size + 5):
        pairs = Counter(round_robin_pair(t, n_prefill, n_decode) for t in range(start, start + size))
        assert len(pairs) == size
        assert set(pairs.values()) == {1}


def test_shares_are_exact_for_the_acceptance_layout() -> None:
    selector = RoundRobin(FakeTickets())
    picks = [selector.pick(2, 3) for _ in range(1200)]
    assert Counter(p for p, _ in picks) == {0: 600, 1: 600}
    assert Counter(d for _, d in picks) == {0: 400, 1: 400, 2: 400}


def test_consecutive_tickets_rotate_both_sides() -> None:
    assert [round_robin_pair(t, 2, 2) for t in range(4)] == [(0, 0), (1, 1), (0, 1), (1, 0)]


def test_huge_tickets_still_map_into_range() -> None:
    p, d = round_robin_pair(2**64 - 1, 3, 5)
    assert 0 <= p < 3 and 0 <= d < 5


def test_random_policy_stays_in_range_and_uses_its_rng() -> None:
    a = Random(random.Random(1))
    b = Random(random.Random(1))
    picks = [a.pick(2, 3) for _ in range(100)]
    assert picks == [b.pick(2, 3) for _ in range(100)]
    assert {p for p, _ in picks} == {0, 1} and {d for _, d in picks} == {0, 1, 2}


def test_make_selector() -> None:
    assert isinstance(make_selector("round_robin", FakeTickets(), random.Random()), RoundRobin)
    assert isinstance(make_selector("random", FakeTickets(), random.Random()), Random)
