"""The transactional outbox: jobs are rows first, messages second.

A job row is inserted in the same transaction as the state change it announces (a new scene, a
retry), and published with publisher confirms afterwards; a row is marked published only once the
broker confirmed it. The watcher and ``jobs retry`` both go through here, so the rule holds for
every job, whoever creates it.
"""

from __future__ import annotations

import json

import psycopg2.extensions

from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.logging import get_logger
from cbmflow.messages import Job
from cbmflow.settings import BusSettings

log = get_logger("watch")


def enqueue(cur: psycopg2.extensions.cursor, msg: Job) -> int:
    """Write one job row in the caller's transaction; returns its outbox id."""
    cur.execute(
        "INSERT INTO outbox (message_id, kind, body) VALUES (%s, %s, %s) RETURNING id",
        (msg.message_id, msg.kind, json.dumps(msg.model_dump(mode="json"))),
    )
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def flush_outbox(dsn: str, bus: BusSettings, batch: int = 500) -> int:
    """Publish pending outbox rows with confirms; returns how many were confirmed.

    Rows are locked ``FOR UPDATE SKIP LOCKED`` so two watchers never publish the same row at the
    same time; each row is marked in the same transaction that locked it, after its confirm.

    A broker that is down, refuses or stops confirming halfway is not an error of the cycle: the
    rows confirmed so far are committed as published, the rest stay pending for the next flush
    (the next cycle, or ``jobs retry``), and the function returns normally. Raising instead
    would make ``watch --interval`` log a failed cycle every time and a supervisor restart
    ``watch --once`` in a loop, for a condition only the broker coming back can fix.
    """
    published = 0
    try:
        conn = busmod.connect(bus)
    except busmod.BROKER_ERRORS as exc:
        log.warning("watch.outbox_deferred", error=str(exc) or type(exc).__name__, stage="connect")
        return 0
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        busmod.declare_topology(channel, bus)
        pg = db.connect(dsn)
        try:
            failure: Exception | None = None
            while failure is None:
                confirmed = 0
                with pg, pg.cursor() as cur:
                    cur.execute(
                        "SELECT id, message_id, kind, body FROM outbox WHERE published_at IS NULL"
                        " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                        (batch,),
                    )
                    rows = cur.fetchall()
                    if not rows:
                        break
                    for out_id, message_id, kind, body in rows:
                        try:
                            busmod.publish(channel, bus, json.dumps(body).encode(), message_id, kind)
                        except busmod.BROKER_ERRORS as exc:
                            failure = exc  # commit what was confirmed; the rest stays pending
                            break
                        cur.execute("UPDATE outbox SET published_at = now() WHERE id = %s", (out_id,))
                        if kind == "ExtractParcels":
                            cur.execute(
                                "UPDATE scenes SET status = 'queued', updated_at = now()"
                                " WHERE id = %s AND status = 'discovered'",
                                (int(body["scene_id"]),),
                            )
                        elif kind == "GenerateCard":
                            cur.execute(
                                "UPDATE card_inputs SET status = 'queued', updated_at = now()"
                                " WHERE id = %s AND status = 'awaiting_card'",
                                (int(body["card_input_id"]),),
                            )
                        confirmed += 1
                published += confirmed
                log.info("watch.outbox_flushed", count=confirmed)
            if failure is not None:
                log.warning("watch.outbox_deferred", error=str(failure) or type(failure).__name__, stage="publish")
        finally:
            pg.close()
    except busmod.BROKER_ERRORS as exc:
        log.warning("watch.outbox_deferred", error=str(exc) or type(exc).__name__, stage="channel")
    finally:
        if conn.is_open:
            try:
                conn.close()
            except busmod.BROKER_ERRORS:
                pass  # the broker went away while we were closing; nothing is left to lose
    return published


def pending_outbox(dsn: str) -> int:
    """Outbox rows not yet confirmed by the broker: jobs that exist but are not in the queue yet."""
    with db.transaction(dsn) as cur:
        cur.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        row = cur.fetchone()
    return int(row[0]) if row else 0
