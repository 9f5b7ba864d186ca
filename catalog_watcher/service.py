"""One watch cycle: scan the catalogue, upsert scenes, write the outbox, publish with confirms.

The scene row and its outbox row are written in one transaction, and an outbox row is marked
published only after the broker confirmed the message. A crash anywhere therefore either loses
nothing (the next cycle re-sends what is still pending) or sends a job twice, which is harmless
because the message id is the scene id and workers claim scenes in the database.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pika.exceptions
import psycopg2
import psycopg2.extensions
import shapely
from shapely.geometry.base import BaseGeometry

from catalog_watcher.stac import SceneRecord, iter_scenes
from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.logging import get_logger
from cbmflow.messages import ExtractParcels
from cbmflow.settings import BusSettings, DbSettings, WatchSettings

log = get_logger("watch")


@dataclass
class WatchReport:
    seen: int = 0
    new: int = 0
    changed: int = 0
    published: int = 0
    pending: int = 0
    rejected: list[str] = field(default_factory=list)


def load_aoi_union(cur: psycopg2.extensions.cursor) -> BaseGeometry | None:
    cur.execute("SELECT ST_AsBinary(ST_Union(geom)) FROM aois")
    row = cur.fetchone()
    if row is None or row[0] is None:
        return None
    return shapely.from_wkb(bytes(row[0]))


def upsert_scene(cur: psycopg2.extensions.cursor, rec: SceneRecord) -> tuple[int, str]:
    """Insert or refresh one scene; returns (scene id, 'new' | 'changed' | 'same').

    A changed product (its ``updated`` stamp moved) is reset to ``discovered`` so it is
    re-extracted; an unchanged one is left exactly as it is.
    """
    cur.execute(
        """
        INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint,
                            location, source_updated)
        VALUES (%s, %s, %s, %s, %s, %s, ST_Multi(ST_GeomFromWKB(%s, 4326)), %s, %s)
        ON CONFLICT (product_id) DO UPDATE
           SET location = EXCLUDED.location, footprint = EXCLUDED.footprint,
               source_updated = EXCLUDED.source_updated, status = 'discovered', reason = NULL,
               updated_at = now()
         WHERE scenes.source_updated IS DISTINCT FROM EXCLUDED.source_updated
        RETURNING id, (xmax = 0) AS inserted
        """,
        (
            rec.product_id,
            rec.product_name,
            rec.mission,
            rec.sensor,
            rec.card,
            rec.acquired_at,
            psycopg2.Binary(shapely.to_wkb(rec.footprint)),
            rec.location,
            rec.updated,
        ),
    )
    row = cur.fetchone()
    if row is None:
        cur.execute("SELECT id FROM scenes WHERE product_id = %s", (rec.product_id,))
        found = cur.fetchone()
        assert found is not None
        return int(found[0]), "same"
    scene_id, inserted = int(row[0]), bool(row[1])
    msg = ExtractParcels(scene_id=scene_id, product_id=rec.product_id, card=rec.card, location=rec.location)
    cur.execute(
        "INSERT INTO outbox (message_id, kind, body) VALUES (%s, %s, %s)",
        (msg.message_id, msg.kind, json.dumps(msg.model_dump(mode="json"))),
    )
    return scene_id, "new" if inserted else "changed"


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
    except (pika.exceptions.AMQPError, OSError) as exc:
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
                        except (pika.exceptions.AMQPError, OSError) as exc:
                            failure = exc  # commit what was confirmed; the rest stays pending
                            break
                        cur.execute("UPDATE outbox SET published_at = now() WHERE id = %s", (out_id,))
                        if kind == "ExtractParcels":
                            cur.execute(
                                "UPDATE scenes SET status = 'queued', updated_at = now()"
                                " WHERE id = %s AND status = 'discovered'",
                                (int(body["scene_id"]),),
                            )
                        confirmed += 1
                published += confirmed
                log.info("watch.outbox_flushed", count=confirmed)
            if failure is not None:
                log.warning("watch.outbox_deferred", error=str(failure) or type(failure).__name__, stage="publish")
        finally:
            pg.close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        log.warning("watch.outbox_deferred", error=str(exc) or type(exc).__name__, stage="channel")
    finally:
        if conn.is_open:
            try:
                conn.close()
            except (pika.exceptions.AMQPError, OSError):
                pass  # the broker went away while we were closing; nothing is left to lose
    return published


def pending_outbox(dsn: str) -> int:
    """Outbox rows not yet confirmed by the broker: jobs that exist but are not in the queue yet."""
    with db.transaction(dsn) as cur:
        cur.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        row = cur.fetchone()
    return int(row[0]) if row else 0


def watch_once(
    dsn: str | None = None, bus: BusSettings | None = None, settings: WatchSettings | None = None
) -> WatchReport:
    bus = bus or BusSettings()
    settings = settings or WatchSettings()
    dsn = dsn or DbSettings().resolved_dsn()
    report = WatchReport()
    with db.transaction(dsn) as cur:
        aoi = load_aoi_union(cur)
    try:
        if aoi is None:
            log.warning("watch.no_aoi")
        else:
            conn = db.connect(dsn)
            try:
                for rec in iter_scenes(
                    settings.catalog_url, settings.collections, aoi, settings.lookback_days, settings.page_size
                ):
                    report.seen += 1
                    with conn, conn.cursor() as cur:
                        scene_id, what = upsert_scene(cur, rec)
                    if what == "new":
                        report.new += 1
                        log.info("watch.scene_new", scene_id=scene_id, product_id=rec.product_id)
                    elif what == "changed":
                        report.changed += 1
                        log.info("watch.scene_changed", scene_id=scene_id, product_id=rec.product_id)
            finally:
                conn.close()
    finally:
        # Also when the scan failed (catalogue down): jobs left pending by an earlier broker outage
        # must not wait for the catalogue to come back.
        report.published = flush_outbox(dsn, bus)
    report.pending = pending_outbox(dsn)
    log.info(
        "watch.cycle",
        seen=report.seen,
        new=report.new,
        changed=report.changed,
        published=report.published,
        pending=report.pending,
    )
    return report


def watch_forever(interval_s: float, **kwargs: object) -> None:
    """Poll at a fixed interval; a failed cycle is logged and retried at the next tick."""
    while True:
        started = time.monotonic()
        try:
            watch_once(**kwargs)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a daemon loop must survive one bad cycle
            log.error("watch.cycle_failed", error=str(exc), error_type=type(exc).__name__)
        time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
