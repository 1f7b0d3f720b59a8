"""State that every worker process shares: memory mapped before Gunicorn forks.

An anonymous shared mapping made in the master is inherited by every worker,
and by the workers Gunicorn starts later to replace dead ones. Counters in it
are advanced with a lock-free atomic fetch-add (libatomic through ctypes), so a
worker killed at any instant can never leave anything held. Where libatomic is
missing, `fcntl.lockf` guards the update: the kernel drops that lock when its
holder dies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import struct
import tempfile
from collections.abc import Callable

_PAGE = mmap.PAGESIZE
_SEQ_CST = 5
_TICKET = 0  # byte offset of the pair-selection counter


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


class SharedCounter:
    """A 64-bit counter that many processes advance together; `next()` never repeats."""

    def __init__(self, state: SharedState, offset: int) -> None:
        self._state = state
        self._offset = offset
        if state.fetch_add is not None:
            self._addr = state.address + offset
            self.next = self._next_atomic  # type: ignore[method-assign]

    def _next_atomic(self) -> int:
        assert self._state.fetch_add is not None
        return self._state.fetch_add(self._addr, 1, _SEQ_CST)

    def next(self) -> int:
        """Return the current value and advance it by one (the locked fallback)."""
        state = self._state
        assert state.lock_fd is not None
        fcntl.lockf(state.lock_fd, fcntl.LOCK_EX)
        try:
            (value,) = struct.unpack_from("<Q", state.buffer, self._offset)
            struct.pack_into("<Q", state.buffer, self._offset, (value + 1) % 2**64)
        finally:
            fcntl.lockf(state.lock_fd, fcntl.LOCK_UN)
        return int(value)

    def value(self) -> int:
        return int(struct.unpack_from("<Q", self._state.buffer, self._offset)[0])


class SharedState:
    """One page of anonymous shared memory; create it before the workers fork."""

    def __init__(self, *, use_atomics: bool = True) -> None:
        self.buffer = mmap.mmap(-1, _PAGE)
        self._view = (ctypes.c_char * _PAGE).from_buffer(self.buffer)
        self.address = ctypes.addressof(self._view)
        self.fetch_add = _load_fetch_add() if use_atomics else None
        self.lock_fd: int | None = None
        if self.fetch_add is None:
            fd, path = tempfile.mkstemp(prefix="minilb-lock-")
            os.unlink(path)
            self.lock_fd = fd
        self.tickets = SharedCounter(self, _TICKET)

    @property
    def lock_free(self) -> bool:
        return self.fetch_add is not None
