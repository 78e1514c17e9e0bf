"""A minimal logical replication client: ``START_REPLICATION`` over libpq's COPY BOTH mode.

psycopg 3 does not speak the streaming replication protocol itself, but it exposes libpq
(``connection.pgconn``), which does; the protocol on top is small (PostgreSQL docs, "Streaming
Replication Protocol"): the server sends ``w`` (XLogData: start LSN, end of WAL, send time,
payload) and ``k`` (keepalive: end of WAL, send time, reply requested); the client sends ``r``
(standby status update: written, flushed and applied LSNs, send time, reply requested).

Why streaming and not ``pg_logical_slot_peek_changes``: each SQL call decodes the WAL again
from the slot's ``restart_lsn``, which trails by up to 15 s of WAL under write load (it only
moves at ``xl_running_xacts`` records), so every poll re-read tens of megabytes. A walsender
keeps its decoding state and decodes each record once.

The ``flushed`` position sent back is the one the consumer has committed with its derived rows
(``change_stream_position.applied_lsn``), never more: the slot may then release the WAL before
it, and a restart resumes there.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import pq

_XLOG_DATA = struct.Struct(">QQQ")
_KEEPALIVE = struct.Struct(">QQB")
_STATUS = struct.Struct(">cQQQqB")
_EPOCH_2000 = 946_684_800  # seconds from 1970-01-01 to PostgreSQL's epoch


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class ReplicationError(Exception):
    """The server refused or ended the stream (message from the server)."""


class ReplicationStream:
    """Streams one logical slot from ``start_lsn``; one message at a time (``read``)."""

    def __init__(
        self, dsn: str, slot: str, start_lsn: int, options: Mapping[str, str], **connect: Any
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.start_lsn = start_lsn
        self.options = options
        self.connect_args = connect
        self.connection: psycopg.AsyncConnection[Any] | None = None
        self.flushed = start_lsn
        # How far the server has decoded: every relevant commit before it has been sent. Set
        # from keepalives (the walsender's position) and XLogData (each message's own LSN).
        self.wal_end = start_lsn
        self._status_at = 0.0

    async def __aenter__(self) -> ReplicationStream:
        self.connection = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, replication="database", **self.connect_args
        )
        try:
            await self._start()
        except BaseException:
            await self.connection.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    @property
    def pgconn(self) -> pq.abc.PGconn:
        assert self.connection is not None
        return self.connection.pgconn

    async def _start(self) -> None:
        options = ", ".join(f"\"{name}\" '{value}'" for name, value in self.options.items())
        command = (
            f'START_REPLICATION SLOT "{self.slot}" LOGICAL {format_lsn(self.start_lsn)} ({options})'
        )
        pgconn = self.pgconn
        pgconn.send_query(command.encode())
        await self._flush()
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            await self._readable(None)
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = result.error_message.decode(errors="replace") if result else "no result"
            raise ReplicationError(message.strip() or "START_REPLICATION failed")

    async def _readable(self, timeout: float | None) -> bool:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self.pgconn.socket

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)

    async def _flush(self) -> None:
        while self.pgconn.flush() == 1:
            await asyncio.sleep(0.001)

    async def read(self, timeout: float) -> tuple[int, bytes] | None:
        """The next XLogData message (its start LSN, its payload), or None after ``timeout``
        seconds without one. Keepalives are answered on the way."""
        pgconn = self.pgconn
        deadline = time.monotonic() + timeout
        while True:
            size, data = pgconn.get_copy_data(1)
            if size == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await self._readable(remaining):
                    await self.status_if_due()
                    return None
                pgconn.consume_input()
                continue
            if size < 0:
                result = pgconn.get_result()
                message = result.error_message.decode(errors="replace") if result else ""
                raise ReplicationError(message.strip() or "the replication stream ended")
            payload = bytes(data)
            kind = payload[:1]
            if kind == b"w":
                start, end, _ = _XLOG_DATA.unpack_from(payload, 1)
                self.wal_end = max(self.wal_end, end)
                return start, payload[1 + _XLOG_DATA.size :]
            if kind == b"k":
                end, _, reply = _KEEPALIVE.unpack_from(payload, 1)
                self.wal_end = max(self.wal_end, end)
                if reply:
                    await self.send_status()

    async def send_status(self, flushed: int | None = None, *, reply: bool = False) -> None:
        """Tell the server what is safely applied (it may release the WAL before it); with
        ``reply``, ask for a keepalive back (it carries how far the server has decoded)."""
        if flushed is not None:
            self.flushed = max(self.flushed, flushed)
        now = int((time.time() - _EPOCH_2000) * 1_000_000)
        message = _STATUS.pack(b"r", self.flushed, self.flushed, self.flushed, now, int(reply))
        if self.pgconn.put_copy_data(message) != 1:
            raise ReplicationError("could not send the standby status")
        await self._flush()
        self._status_at = time.monotonic()

    async def status_if_due(self, every: float = 2.0) -> None:
        """While idle: report the position and ask how far the server got, so that WAL of
        other databases and of other tables does not pile up behind this slot."""
        if time.monotonic() - self._status_at >= every:
            await self.send_status(reply=True)
