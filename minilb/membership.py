"""The server table: which servers exist and which are healthy, shared by every worker.

The table lives in shared memory as JSON in two slots. A writer (under an
`fcntl` lock, so a writer that dies holds nothing) fills the inactive slot,
then flips one atomic word to it; a reader follows the word, so it never sees
a half-written table, and a writer killed mid-write leaves the old table in
force. Each worker keeps the decoded table until the word changes, so the
check on the hot path is one atomic load.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import msgspec

from minilb.config import Config
from minilb.errors import HTTPError, NotFound
from minilb.servers import Role, ServerRecord, ServerSet
from minilb.shared import (
    MAX_SERVERS,
    SERVER_IN_FLIGHT,
    TABLE_BYTES,
    TABLE_LOCK,
    TABLE_SLOTS,
    TABLE_WORD,
    SharedState,
)


class Conflict(HTTPError):
    status = 409
    type = "conflict_error"


class _Table(msgspec.Struct):
    next_id: int = 0
    servers: list[ServerRecord] = msgspec.field(default_factory=list)


_decoder = msgspec.json.Decoder(_Table)
_encoder = msgspec.json.Encoder()


class Membership:
    """Reads and changes the shared server table."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self._version = -1
        self._table = _Table()
        self._set = ServerSet.of([])

    # reading

    def _read(self) -> tuple[int, _Table]:
        while True:
            word = self.shared.load(TABLE_WORD)
            if word >> 1 == self._version:
                return self._version, self._table
            offset = TABLE_SLOTS + (word & 1) * TABLE_BYTES
            (length,) = struct.unpack_from("<I", self.shared.buffer, offset)
            data = bytes(self.shared.buffer[offset + 4 : offset + 4 + length])
            # Two flips during the read would mean this slot was rewritten under us.
            if (self.shared.load(TABLE_WORD) >> 1) - (word >> 1) < 2:
                table = _decoder.decode(data) if length else _Table()
                return word >> 1, table

    def servers(self) -> ServerSet:
        """The current servers; cheap when nothing changed since the last call."""
        version, table = self._read()
        if version != self._version:
            self._version, self._table = version, table
            self._set = ServerSet.of(table.servers)
        return self._set

    def in_flight(self, server_id: int) -> int:
        return self.shared.signed(SERVER_IN_FLIGHT + 8 * server_id)

    # writing

    def _change(self, edit: Callable[[_Table], _Table | None]) -> None:
        with self.shared.locked(TABLE_LOCK):
            word = self.shared.load(TABLE_WORD)
            self._version = -1  # force a fresh read
            _, table = self._read()
            new = edit(msgspec.structs.replace(table, servers=list(table.servers)))
            if new is None:
                return
            data = _encoder.encode(new)
            if len(data) + 4 > TABLE_BYTES:
                raise Conflict(f"the server table is full ({len(new.servers)} servers)")
            slot = 1 - (word & 1)
            offset = TABLE_SLOTS + slot * TABLE_BYTES
            struct.pack_into("<I", self.shared.buffer, offset, len(data))
            self.shared.buffer[offset + 4 : offset + 4 + len(data)] = data
            new_word = (((word >> 1) + 1) << 1) | slot
            self.shared.add(TABLE_WORD, new_word - word)

    def initialise(self, config: Config) -> None:
        """Fill an empty table from the configuration; a table already filled is kept."""

        def edit(table: _Table) -> _Table | None:
            if table.servers or table.next_id:
                return None
            for p in config.prefill:
                table = _with(table, "prefill", p.url, p.bootstrap_port)
            for d in config.decode:
                table = _with(table, "decode", d.url, None)
            return table

        self._change(edit)

    def add(self, role: Role, url: str, bootstrap_port: int | None) -> ServerRecord:
        added: list[ServerRecord] = []

        def edit(table: _Table) -> _Table:
            new = _with(table, role, url, bootstrap_port)
            added.append(new.servers[-1])
            self.shared.add(SERVER_IN_FLIGHT + 8 * added[0].id, -self.in_flight(added[0].id))
            return new

        self._change(edit)
        return added[0]

    def remove(self, url: str) -> ServerRecord:
        removed: list[ServerRecord] = []
        key = url.rstrip("/")

        def edit(table: _Table) -> _Table:
            keep = [s for s in table.servers if s.url != key]
            removed.extend(s for s in table.servers if s.url == key)
            if not removed:
                raise NotFound(f"no server with URL {url!r}; GET /workers lists them")
            table.servers = keep
            return table

        self._change(edit)
        return removed[0]

    def set_health(self, health: dict[str, bool]) -> None:
        """Record health by URL; the table is rewritten only when something changed."""

        def edit(table: _Table) -> _Table | None:
            changed = False
            servers = []
            for s in table.servers:
                healthy = health.get(s.url, s.healthy)
                changed |= healthy != s.healthy
                servers.append(msgspec.structs.replace(s, healthy=healthy) if healthy != s.healthy else s)
            if not changed:
                return None
            table.servers = servers
            return table

        self._change(edit)


def _with(table: _Table, role: Role, url: str, bootstrap_port: int | None) -> _Table:
    key = url.rstrip("/")
    for s in table.servers:
        if s.url == key:
            raise Conflict(f"{s.role} server {key} is already registered")
    used = {s.id for s in table.servers}
    if len(used) >= MAX_SERVERS:
        raise Conflict(f"minilb holds at most {MAX_SERVERS} servers")
    new_id = table.next_id % MAX_SERVERS
    while new_id in used:
        new_id = (new_id + 1) % MAX_SERVERS
    record = ServerRecord(id=new_id, role=role, url=key, bootstrap_port=bootstrap_port)
    table.servers.append(record)
    table.next_id = new_id + 1
    return table
