"""Server-side prepared statements for the hot routes, one set per pooled connection.

psycopg2 interpolates parameters on the client and sends plain text, so PostgreSQL parses,
analyses and plans ``parcelTimeSeries``' statement on every request: 0.33 ms of planning on top
of ~1 ms of execution on the 50M-row benchmark (docs/performance.md "API"). A statement prepared
once per connection and run with ``EXECUTE`` skips all of that; the client round trip fell from
1.76 ms to 1.04 ms p50 in the same measurement.

Parameters are still bound by psycopg2 (``EXECUTE name (%(a)s, ...)`` is interpolated with its
usual quoting), so nothing about SQL safety changes: the prepared text is built from our own
``sql.Composed`` only, never from input. PostgreSQL re-analyses a prepared statement by itself
when a table it reads is altered or dropped and recreated, so a parcel re-import needs no care.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from cbmflow.db import Cursor

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")
_MAX_STATEMENTS = 512


class PreparingConnection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection that remembers which statements it has prepared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared: set[str] = set()


@dataclass(frozen=True)
class _Statement:
    name: str
    prepare: str
    execute: str


_statements: dict[Hashable, _Statement] = {}
_lock = threading.Lock()


def _compile(text: str) -> _Statement:
    """``... %(a)s ... %(b)s ... %(a)s`` → ``PREPARE n AS ... $1 ... $2 ... $1`` and ``EXECUTE n (%(a)s, %(b)s)``."""
    order: list[str] = []

    def positional(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return "%"  # a literal percent sign: sent as is, since PREPARE is not interpolated
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    body = _PLACEHOLDER.sub(positional, text)
    name = "cbm_" + hashlib.sha256(body.encode()).hexdigest()[:24]
    args = ", ".join(f"%({n})s" for n in order)
    return _Statement(name, f"PREPARE {name} AS {body}", f"EXECUTE {name} ({args})" if order else f"EXECUTE {name}")


def _statement(cur: Cursor, key: Hashable, build: Callable[[], sql.Composable]) -> _Statement:
    stmt = _statements.get(key)
    if stmt is None:
        stmt = _compile(build().as_string(cur))
        with _lock:
            if len(_statements) >= _MAX_STATEMENTS:
                _statements.clear()
            _statements[key] = stmt
    return stmt


def execute(cur: Cursor, key: Hashable, build: Callable[[], sql.Composable], params: Mapping[str, Any]) -> None:
    """Run the statement ``build()`` (cached under ``key``) as a prepared statement when the
    cursor's connection is a :class:`PreparingConnection`, else as plain text.

    ``key`` must determine the statement's text: the same key, the same SQL. Composing the
    statement and rendering it are themselves Python work on every request, so both are done once
    per key.
    """
    prepared: set[str] | None = getattr(getattr(cur, "connection", None), "prepared", None)
    if prepared is None:
        cur.execute(build(), params)
        return
    stmt = _statement(cur, key, build)
    if stmt.name not in prepared:
        cur.execute(stmt.prepare)
        prepared.add(stmt.name)
    cur.execute(stmt.execute, params)


async def execute_async(
    cur: Cursor,
    key: Hashable,
    build: Callable[[], sql.Composable],
    params: Mapping[str, Any],
    wait: Callable[[Any], Awaitable[None]],
) -> None:
    """:func:`execute` on an asynchronous connection, ``wait`` driving it (``api.aiodb.wait``)."""
    conn = cur.connection
    stmt = _statement(cur, key, build)
    if stmt.name not in conn.prepared:
        cur.execute(stmt.prepare)
        await wait(conn)
        conn.prepared.add(stmt.name)
    cur.execute(stmt.execute, params)
    await wait(conn)
