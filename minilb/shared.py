"""State that every worker process shares: memory mapped before Gunicorn forks.

An anonymous shared mapping made in the master is inherited by every worker,
and by the workers Gunicorn starts later to replace dead ones. Counters in it
are advanced with a lock-free atomic fetch-add (libatomic through ctypes), so a
worker killed at any instant can never leave anything held. Where libatomic is
missing, `fcntl.lockf` guards each update instead: the kernel drops that lock
when its holder dies. Rare writes of larger data (the server table) take an
`fcntl.lockf` lock for the same reason.

Layout (byte offsets):

    0        pair-selection tickets
    8        server table word: version << 1 | active slot
    16       requests in flight, all workers
    64       requests in flight per worker slot   (MAX_WORKERS x 8)
    1024     requests in flight per server id     (MAX_SERVERS x 8)
    16384    server table, slot 0                 (TABLE_BYTES: u32 length, JSON)
    16384+T  server table, slot 1
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator

MAX_WORKERS = 64
MAX_SERVERS = 1024
TABLE_BYTES = 64 * 1024

TICKETS = 0
TABLE_WORD = 8
IN_FLIGHT = 16
WORKER_IN_FLIGHT = 64
SERVER_IN_FLIGHT = 1024
TABLE_SLOTS = 16384
SIZE = TABLE_SLOTS + 2 * TABLE_BYTES

_SEQ_CST = 5
_U64 = 2**64

# Byte ranges of the lock file, one per purpose.
TABLE_LOCK = 0
PROBER_LOCK = 1


def _load_fetch_add() -> Callable[[int, int, int], int] | None:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    func = lib.__atomic_fetch_add_8
    func.restype = ctypes.c_uint64
    func.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    return func  # type: ignore[no-any-return]


class SharedState:
    """The shared mapping and its lock file; create it before the workers fork."""

    def __init__(self, *, use_atomics: bool = True) -> None:
        self.buffer = mmap.mmap(-1, SIZE)
        self._view = (ctypes.c_char * SIZE).from_buffer(self.buffer)
        self._address = ctypes.addressof(self._view)
        self._fetch_add = _load_fetch_add() if use_atomics else None
        fd, path = tempfile.mkstemp(prefix="minilb-lock-")
        os.unlink(path)
        self.lock_fd = fd
        self.tickets = SharedCounter(self, TICKETS)
        from minilb.metrics import new_buffer  # the metrics module sizes its own mapping

        self.metrics = new_buffer()

    @property
    def lock_free(self) -> bool:
        return self._fetch_add is not None

    def add(self, offset: int, delta: int) -> int:
        """Atomically add `delta` (may be negative) to the u64 at `offset`; return the old value."""
        if self._fetch_add is not None:
            return self._fetch_add(self._address + offset, delta % _U64, _SEQ_CST)
        with self.locked(TABLE_LOCK):
            (value,) = struct.unpack_from("<Q", self.buffer, offset)
            struct.pack_into("<Q", self.buffer, offset, (value + delta) % _U64)
        return int(value)

    def load(self, offset: int) -> int:
        return self.add(offset, 0)

    def signed(self, offset: int) -> int:
        value = self.load(offset)
        return value - _U64 if value >= 2**63 else value

    @contextlib.contextmanager
    def locked(self, which: int) -> Iterator[None]:
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX, 1, which)
        try:
            yield
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN, 1, which)

    def try_lock(self, which: int) -> bool:
        """Take the lock without waiting; it is held until `unlock` or this process dies."""
        try:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, which)
        except OSError:
            return False
        return True

    def unlock(self, which: int) -> None:
        fcntl.lockf(self.lock_fd, fcntl.LOCK_UN, 1, which)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


class SharedCounter:
    """A 64-bit counter that many processes advance together; `next()` never repeats."""

    def __init__(self, state: SharedState, offset: int) -> None:
        self._state = state
        self._offset = offset

    def next(self) -> int:
        return self._state.add(self._offset, 1)

    def value(self) -> int:
        return self._state.load(self._offset)
