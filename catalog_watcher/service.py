"""One watch cycle: scan the catalogue, upsert scenes, write the outbox, publish with confirms.

The scene row and its outbox row are written in one transaction, and an outbox row is marked
published only after the broker confirmed the message. A crash anywhere therefore either loses
nothing (the next cycle re-sends what is still pending) or sends a job twice, which is harmless
because the message id is the scene id and workers claim scenes in the database.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions
import shapely
from shapely.geometry.base import BaseGeometry

from catalog_watcher.stac import SceneRecord, iter_scenes
from cbmflow import db
from cbmflow.logging import get_logger
from cbmflow.messages import ExtractParcels
from cbmflow.outbox import enqueue, flush_outbox, pending_outbox
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
    re-extracted; an unchanged one is left exactly as it is. The reset bumps the scene's
    ``generation`` and clears its lease: a worker still extracting the previous version then has
    its commit refused (it claimed the old generation) instead of marking the new version done.
    """
    cur.execute(
        """
        INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint,
                            location, source_updated)
        VALUES (%s, %s, %s, %s, %s, %s, ST_Multi(ST_GeomFromWKB(%s, 4326)), %s, %s)
        ON CONFLICT (product_id) DO UPDATE
           SET location = EXCLUDED.location, footprint = EXCLUDED.footprint,
               source_updated = EXCLUDED.source_updated, status = 'discovered', reason = NULL,
               generation = scenes.generation + 1, lease_owner = NULL, lease_until = NULL,
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
    enqueue(cur, ExtractParcels(scene_id=scene_id, product_id=rec.product_id, card=rec.card, location=rec.location))
    return scene_id, "new" if inserted else "changed"


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
