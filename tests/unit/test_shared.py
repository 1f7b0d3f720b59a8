from __future__ import annotations

import os
import signal

import pytest

from minilb.shared import SharedState


@pytest.mark.parametrize("atomics", [True, False])
def test_counter_is_shared_by_forked_processes_without_loss(atomics: bool) -> None:
    state = SharedState(use_atomics=atomics)
    assert state.lock_free is atomics
    per_child, children = 5000, 4
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            for _ in range(per_child):
                state.tickets.next()
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert state.tickets.value() == per_child * children
    assert state.tickets.next() == per_child * children


@pytest.mark.parametrize("atomics", [True, False])
def test_a_process_killed_while_counting_blocks_nobody(atomics: bool) -> None:
    state = SharedState(use_atomics=atomics)
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            while True:
                state.tickets.next()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        before = state.tickets.value()
        assert state.tickets.next() == before  # would hang if a lock had been left held
