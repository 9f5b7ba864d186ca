"""psycopg2 in asynchronous mode on the event loop, for the one route that carries the load.

Every other route is a sync endpoint that Starlette runs in its thread pool, which is simple and
fine at their rates. ``parcelTimeSeries`` is different: clients (the JRC ``cbm`` client, notebooks
walking a country's parcels) call it in tight loops, and the thread-pool hop, the GIL hand-offs
around the blocking socket read and the sync framework path cost 0.76 ms of API CPU per request
where the same work on the event loop costs 0.34 ms (docs/performance.md "API"). On a 2-core
host shared with PostgreSQL that is the difference between missing and meeting 1,000 req/s.

psycopg2's asynchronous connections (``async_=True``) send a query without blocking and expose
``poll()``; waiting for the socket with ``loop.add_reader`` is the whole integration (the same
technique as aiopg). They are always autocommit, which the API's read-only routes are anyway.
The connection options (read-only, statement timeout, application name) are the sync pool's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg2
import psycopg2.extensions

from api.prepared import PreparingConnection


async def wait(conn: Any) -> None:
    """Drive ``conn`` until its current operation completes; raises what the server raised."""
    loop = asyncio.get_running_loop()
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            watch, unwatch = loop.add_reader, loop.remove_reader
        elif state == psycopg2.extensions.POLL_WRITE:
            watch, unwatch = loop.add_writer, loop.remove_writer
        else:  # pragma: no cover - psycopg2 documents no other state
            raise psycopg2.OperationalError(f"unexpected poll state {state}")
        fd = conn.fileno()
        ready = loop.create_future()
        watch(fd, ready.set_result, None)
        try:
            await ready
        finally:
            unwatch(fd)


class AsyncPool:
    """Asynchronous connections opened on demand up to ``size`` and kept until they break.

    A connection that raised anything is closed rather than returned: an asynchronous psycopg2
    connection cannot be told apart from a half-read one after an error, and opening a new one is
    cheap next to serving a broken one.
    """

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._size = max(1, size)
        self._idle: list[Any] = []
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    async def _connect(self) -> Any:
        conn = psycopg2.connect(self._dsn, connection_factory=PreparingConnection, async_=True)
        try:
            await wait(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @asynccontextmanager
    async def connection(self, wait_s: float = 30.0) -> AsyncIterator[Any]:
        if self._slots is None:  # created on the loop that uses it
            self._slots = asyncio.Semaphore(self._size)
        try:
            await asyncio.wait_for(self._slots.acquire(), wait_s)
        except TimeoutError:
            raise psycopg2.OperationalError("no database connection free") from None
        conn = None
        ok = False
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
            yield conn
            ok = True
        finally:
            if conn is not None:
                if ok and not conn.closed and not self._closed:
                    self._idle.append(conn)
                else:
                    conn.close()
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
