"""A cap on requests in flight across all workers, and the count it keeps.

The count is one atomic counter in shared memory. Each worker also keeps its
own share in its slot, so that when a worker dies with requests in flight the
Gunicorn master can take its share back out of the total (`release_slot`).
"""

from __future__ import annotations

from minilb.errors import HTTPError
from minilb.shared import IN_FLIGHT, WORKER_IN_FLIGHT, SharedState


class TooManyRequests(HTTPError):
    status = 429
    type = "rate_limit_error"


class Admission:
    def __init__(self, shared: SharedState, limit: int, slot: int) -> None:
        self._add = shared.add
        self._shared = shared
        self.limit = limit
        self._slot = WORKER_IN_FLIGHT + 8 * slot

    def enter(self) -> None:
        """Count one more request in flight, or raise TooManyRequests past the limit."""
        self._add(self._slot, 1)
        before = self._add(IN_FLIGHT, 1)
        if self.limit and before >= self.limit:
            self.leave()
            raise TooManyRequests(
                f"minilb is at its limit of {self.limit} requests in flight; retry shortly"
            )

    def leave(self) -> None:
        self._add(IN_FLIGHT, -1)
        self._add(self._slot, -1)

    def in_flight(self) -> int:
        return self._shared.signed(IN_FLIGHT)


def release_slot(shared: SharedState, slot: int) -> None:
    """Forget a dead worker's requests: take its share out of the total."""
    offset = WORKER_IN_FLIGHT + 8 * slot
    share = shared.signed(offset)
    shared.add(IN_FLIGHT, -share)
    shared.add(offset, -share)
