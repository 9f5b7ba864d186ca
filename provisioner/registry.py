"""The provisioner's side of the ``workers`` table: what each worker last reported, and drain requests.

The registry is the only place that knows whether a worker is busy, so both drivers join their
servers or processes with it by worker id (the server name for VMs, ``local-…`` for processes).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2

from cbmflow.logging import get_logger

log = get_logger("provisioner")

# A lookup must not stall `provision status` or a control step when the database is down.
CONNECT_TIMEOUT_S = 3


@dataclass(frozen=True)
class RegistryRow:
    state: str
    current_scene: int | None
    heartbeat_age_s: float
    host: str


def read(dsn: str | None, ids: list[str]) -> dict[str, RegistryRow] | None:
    """Rows of these workers, by id; None when the registry is unknown or unreachable."""
    if not dsn:
        return None
    if not ids:
        return {}
    try:
        conn = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg2.Error as exc:
        log.warning("provision.registry_unreachable", error=str(exc).strip()[:300])
        return None
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT id, state, current_scene, EXTRACT(EPOCH FROM now() - heartbeat_at), host"
                " FROM workers WHERE id = ANY(%s)",
                (ids,),
            )
            return {str(row[0]): RegistryRow(str(row[1]), row[2], float(row[3]), str(row[4])) for row in cur.fetchall()}
    except psycopg2.Error as exc:
        log.warning("provision.registry_failed", error=str(exc).strip()[:300])
        return None
    finally:
        conn.close()


def request_drain(dsn: str | None, ids: list[str]) -> list[str]:
    """Set ``state = 'draining'``: the worker's heartbeat (every CBMFLOW_WORKER_HEARTBEAT_S) sees it,
    stops consuming, finishes or requeues its job and exits. Returns the ids whose row was marked.

    This is how a VM is drained without SSH: the worker dials out to the database anyway.
    """
    if not dsn or not ids:
        return []
    try:
        conn = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg2.Error as exc:
        log.warning("provision.registry_unreachable", error=str(exc).strip()[:300])
        return []
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE workers SET state = 'draining' WHERE id = ANY(%s) AND state <> 'stopped' RETURNING id",
                (ids,),
            )
            return sorted(str(row[0]) for row in cur.fetchall())
    except psycopg2.Error as exc:
        log.warning("provision.registry_failed", error=str(exc).strip()[:300])
        return []
    finally:
        conn.close()
