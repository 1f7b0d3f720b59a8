from __future__ import annotations

import pytest

from minilb.health import HealthTracker


@pytest.mark.parametrize(
    ("failures", "successes", "results", "expected"),
    [
        (2, 1, [False], [True]),  # one failure is not enough
        (2, 1, [False, False], [True, False]),
        (2, 1, [False, True, False], [True, True, True]),  # a success resets the count
        (1, 2, [False, True, True], [False, False, True]),  # back after two successes
        (1, 1, [False, True, False, True], [False, True, False, True]),
    ],
)
def test_thresholds(failures: int, successes: int, results: list[bool], expected: list[bool]) -> None:
    tracker = HealthTracker(failures, successes)
    healthy = True
    seen = []
    for ok in results:
        healthy = tracker.observe("http://s:1", ok, healthy)
        seen.append(healthy)
    assert seen == expected


def test_servers_are_tracked_apart_and_forgotten() -> None:
    tracker = HealthTracker(2, 1)
    assert tracker.observe("a", False, True) is True
    assert tracker.observe("b", False, True) is True
    assert tracker.observe("a", False, True) is False
    tracker.forget({"b"})
    assert tracker.observe("a", False, True) is True  # its count started over
    assert tracker.observe("b", False, True) is False
