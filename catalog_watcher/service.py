"""One watch cycle: scan the catalogue, upsert scenes, write the outbox, publish with confirms.

The scene row and its outbox row are written in one transaction, and an outbox row is marked
published only after the broker confirmed the message. A crash anywhere therefore either loses
nothing (the next cycle re-sends what is still pending) or sends a job twice, which is harmless
because the message id is the scene id and workers claim scenes in the database.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import psycopg2.extensions
import shapely
from psycopg2 import sql
from shapely.geometry.base import BaseGeometry

from catalog_watcher.http import WatchStopped
from catalog_watcher.sources import Source, make_sources
from catalog_watcher.stac import Offline, Rejected, SceneRecord
from cbmflow import db
from cbmflow.errors import CbmflowError
from cbmflow.logging import get_logger
from cbmflow.messages import ExtractParcels, GenerateCard
from cbmflow.outbox import enqueue, flush_outbox, pending_outbox
from cbmflow.settings import BusSettings, DbSettings, WatchSettings

log = get_logger("watch")


class ScanFailed(CbmflowError):
    """At least one (source, collection) scan ended early; the others ran and the outbox was flushed.

    Raised at the end of the cycle, carrying its report, so that one catalogue being down neither
    hides the others' scenes nor passes for a clean cycle.
    """

    def __init__(self, report: WatchReport) -> None:
        super().__init__("; ".join(report.errors))
        self.report = report


@dataclass
class WatchReport:
    seen: int = 0
    new: int = 0
    changed: int = 0
    superseded: int = 0
    duplicates: int = 0
    offline: int = 0
    deleted: int = 0
    """Scenes whose product the catalogue deleted (marked, rows kept)."""
    card_inputs: dict[str, int] = field(default_factory=dict)
    """Sentinel-1 GRD/SLC products recorded as CARD inputs (a GRD's ``GenerateCard`` job written for
    ``new``/``changed``/``superseded``), by outcome (``new``, ``changed``, ``superseded``, ``same``,
    ``duplicate``); never rejections."""
    published: int = 0
    pending: int = 0
    rejected: list[str] = field(default_factory=list)
    """``source/collection/item id: reason`` of each item that could not be normalised."""
    errors: list[str] = field(default_factory=list)
    """``source/collection: error`` of each scan that ended early (its cursor keeps what it read)."""
    requests: dict[str, int] = field(default_factory=dict)
    cursor_lag_s: dict[str, float] = field(default_factory=dict)
    """Per source: seconds between now and its oldest cursor (a stuck source grows this)."""


def load_aoi_union(cur: psycopg2.extensions.cursor) -> BaseGeometry | None:
    cur.execute("SELECT ST_AsBinary(ST_Union(geom)) FROM aois")
    row = cur.fetchone()
    if row is None or row[0] is None:
        return None
    return shapely.from_wkb(bytes(row[0]))


def _requeue(cur: psycopg2.extensions.cursor, scene_id: int) -> None:
    """The scene's data changed: extract it again (the worker replaces its rows in one transaction).

    The generation bump and the cleared lease make a worker still extracting the previous version
    have its commit refused (it claimed the old generation) instead of marking the new one done.
    """
    cur.execute(
        "UPDATE scenes SET status = 'discovered', reason = NULL, generation = generation + 1,"
        " lease_owner = NULL, lease_until = NULL, updated_at = now() WHERE id = %s",
        (scene_id,),
    )


def _identity_outcome(rec: SceneRecord, product_id: str, baseline: int, checksum: str) -> str:
    """What a catalogue record is to the row already holding its acquisition (scenes and CARD inputs
    alike): ``same`` (same product; an ``updated`` change alone), ``changed`` (same product, new
    checksum), ``superseded`` (a higher processing baseline) or ``duplicate`` (anything else: another
    collection or source, or an older baseline)."""
    if product_id == rec.product_id:
        return "changed" if rec.checksum and checksum and rec.checksum != checksum else "same"
    return "superseded" if rec.baseline > baseline else "duplicate"


def upsert_scene(
    cur: psycopg2.extensions.cursor, rec: SceneRecord, source: str = "", store_profile: str = ""
) -> tuple[int, str]:
    """Record one catalogue product against its acquisition; returns (scene id, outcome).

    Outcomes: ``new`` (first product of this acquisition), ``superseded`` (a higher processing
    baseline: the same row is re-pointed at it and re-queued), ``changed`` (same product, its
    checksum changed), ``same`` (same product; a moved ``updated`` alone changes nothing) and
    ``duplicate`` (the acquisition is already held by a product of an equal or higher baseline,
    e.g. the same product seen in a second collection or source). Only ``new``, ``superseded``
    and ``changed`` write an outbox row. The row lock (``FOR UPDATE``) serialises two watchers.
    ``store_profile`` (the source's ``store``) is written with the product it belongs to.
    """
    cur.execute(
        "SELECT id, product_id, coalesce(baseline, 0), coalesce(checksum, '') FROM scenes"
        " WHERE acq_key = %s OR product_id = %s ORDER BY (acq_key = %s) DESC LIMIT 1 FOR UPDATE",
        (rec.key, rec.product_id, rec.key),
    )
    row = cur.fetchone()
    footprint = psycopg2.Binary(shapely.to_wkb(rec.footprint))
    if row is None:
        cur.execute(
            """
            INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint,
                                location, source_updated, acq_key, baseline, checksum, source, collection,
                                published_at, store_profile)
            VALUES (%s, %s, %s, %s, %s, %s, ST_Multi(ST_GeomFromWKB(%s, 4326)), %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT DO NOTHING
            RETURNING id
            """,
            (
                rec.product_id,
                rec.product_name,
                rec.mission,
                rec.sensor,
                rec.card,
                rec.acquired_at,
                footprint,
                rec.location,
                rec.updated,
                rec.key,
                rec.baseline,
                rec.checksum or None,
                source or None,
                rec.collection or None,
                rec.published,
                store_profile or None,
            ),
        )
        inserted = cur.fetchone()
        if inserted is None:  # another watcher inserted it since our SELECT: take the locked path
            return upsert_scene(cur, rec, source, store_profile)
        scene_id, outcome = int(inserted[0]), "new"
    else:
        scene_id = int(row[0])
        outcome = _identity_outcome(rec, str(row[1]), int(row[2]), str(row[3]))
        if outcome == "same":
            cur.execute(
                "UPDATE scenes SET source_updated = %s, published_at = coalesce(published_at, %s) WHERE id = %s",
                (rec.updated, rec.published, scene_id),
            )
            return scene_id, outcome
        if outcome == "duplicate":
            return scene_id, outcome
        cur.execute(
            """
            UPDATE scenes
               SET product_id = %s, product_name = %s, location = %s, footprint = ST_Multi(ST_GeomFromWKB(%s, 4326)),
                   source_updated = %s, baseline = %s, checksum = %s, source = %s, collection = %s,
                   published_at = %s, deleted_at = NULL, store_profile = %s,
                   superseded_ids = CASE WHEN product_id = %s THEN superseded_ids
                                         ELSE array_append(superseded_ids, product_id) END
             WHERE id = %s
            """,
            (
                rec.product_id,
                rec.product_name,
                rec.location,
                footprint,
                rec.updated,
                rec.baseline,
                rec.checksum or None,
                source or None,
                rec.collection or None,
                rec.published,
                store_profile or None,
                rec.product_id,
                scene_id,
            ),
        )
        _requeue(cur, scene_id)
    enqueue(cur, ExtractParcels(scene_id=scene_id, product_id=rec.product_id, card=rec.card, location=rec.location))
    return scene_id, outcome


def upsert_card_input(
    cur: psycopg2.extensions.cursor, rec: SceneRecord, source: str = "", store_profile: str = ""
) -> tuple[int, str]:
    """Record a Sentinel-1 GRD/SLC product as a CARD input; returns (row id, outcome).

    The same identity rules as :func:`upsert_scene` (key = acquisition, a higher baseline or a new
    checksum re-points the row, an equal one is a duplicate). A GRD's ``GenerateCard(bs)`` job is
    written to the outbox in the same transaction when the outcome is ``new``, ``changed`` or
    ``superseded`` (never for ``same`` or ``duplicate``); an SLC is paired instead (:func:`pair_slc`:
    its ``GenerateCard(coh)`` when its predecessor on the orbit is recorded, and the job of a
    successor that was waiting for it). A re-pointed row goes back to ``awaiting_card`` with its
    generation bumped and its lease cleared, so a worker still generating the previous version has
    its commit refused and the new job generates from the new product.
    """
    cur.execute(
        "SELECT id, product_id, baseline, coalesce(checksum, '') FROM card_inputs"
        " WHERE acq_key = %s OR product_id = %s ORDER BY (acq_key = %s) DESC LIMIT 1 FOR UPDATE",
        (rec.key, rec.product_id, rec.key),
    )
    row = cur.fetchone()
    footprint = psycopg2.Binary(shapely.to_wkb(rec.footprint))
    if row is None:
        cur.execute(
            """
            INSERT INTO card_inputs (acq_key, kind, product_id, product_name, mission, product_type,
                                     relative_orbit, acquired_at, footprint, location, source, collection,
                                     baseline, checksum, source_updated, published_at, store_profile)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, ST_Multi(ST_GeomFromWKB(%s, 4326)), %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT DO NOTHING
            RETURNING id
            """,
            (
                rec.key,
                rec.card,
                rec.product_id,
                rec.product_name,
                rec.mission,
                rec.sensor,
                rec.relative_orbit,
                rec.acquired_at,
                footprint,
                rec.location,
                source or None,
                rec.collection or None,
                rec.baseline,
                rec.checksum or None,
                rec.updated,
                rec.published,
                store_profile or None,
            ),
        )
        inserted = cur.fetchone()
        if inserted is None:  # another watcher inserted it since our SELECT: take the locked path
            return upsert_card_input(cur, rec, source, store_profile)
        _enqueue_card(cur, int(inserted[0]), rec)
        return int(inserted[0]), "new"
    input_id = int(row[0])
    outcome = _identity_outcome(rec, str(row[1]), int(row[2]), str(row[3]))
    if outcome == "same":
        cur.execute(
            "UPDATE card_inputs SET source_updated = %s, published_at = coalesce(published_at, %s) WHERE id = %s",
            (rec.updated, rec.published, input_id),
        )
        return input_id, outcome
    if outcome == "duplicate":
        return input_id, outcome
    cur.execute(
        """
        UPDATE card_inputs
           SET product_id = %s, product_name = %s, location = %s, footprint = ST_Multi(ST_GeomFromWKB(%s, 4326)),
               source_updated = %s, baseline = %s, checksum = %s, source = %s, collection = %s,
               published_at = %s, deleted_at = NULL, status = 'awaiting_card', updated_at = now(),
               store_profile = %s, reason = NULL, generation = generation + 1, lease_owner = NULL,
               lease_until = NULL,
               superseded_ids = CASE WHEN product_id = %s THEN superseded_ids
                                     ELSE array_append(superseded_ids, product_id) END
         WHERE id = %s
        """,
        (
            rec.product_id,
            rec.product_name,
            rec.location,
            footprint,
            rec.updated,
            rec.baseline,
            rec.checksum or None,
            source or None,
            rec.collection or None,
            rec.published,
            store_profile or None,
            rec.product_id,
            input_id,
        ),
    )
    _enqueue_card(cur, input_id, rec)
    return input_id, outcome


def _enqueue_card(cur: psycopg2.extensions.cursor, input_id: int, rec: SceneRecord) -> None:
    """A GRD's backscatter job, or an SLC's pairing, in the caller's transaction."""
    if rec.card == "grd":
        enqueue(cur, GenerateCard(card_input_id=input_id, product_id=rec.product_id, card="bs", location=rec.location))
    elif rec.card == "slc":
        pair_slc(cur, input_id)


# --- coherence pairs ------------------------------------------------------------------------------

COH_GAPS_DAYS = (6, 12)
"""The repeat gaps a coherence pair may have, preferred first: 6 days with two satellites on the
orbit (S1A+S1B until December 2021, S1A+S1C from 2025), 12 with one (S1A alone in between)."""
COH_TOLERANCE = timedelta(days=1)
"""How far from a whole gap two acquisitions may be (a repeat pass is the same to seconds; a
slice's start time moves by a few seconds with the frame, never by a day)."""


@dataclass(frozen=True)
class SlcAcquisition:
    """What the pairing rule looks at: an SLC card input's orbit, time and footprint (lon/lat)."""

    id: int
    relative_orbit: int | None
    acquired_at: datetime
    footprint: BaseGeometry


def coherence_gap(early: SlcAcquisition, late: SlcAcquisition) -> int | None:
    """The gap in days (6 or 12) of a valid pair, else None: same relative orbit, footprints that
    overlap (an area, not a shared edge), ``late`` 6 or 12 days after ``early`` within the tolerance."""
    if early.id == late.id or early.relative_orbit is None or early.relative_orbit != late.relative_orbit:
        return None
    dt = late.acquired_at - early.acquired_at
    gap = next((g for g in COH_GAPS_DAYS if abs(dt - timedelta(days=g)) <= COH_TOLERANCE), None)
    if gap is None or early.footprint.intersection(late.footprint).area <= 0:
        return None
    return gap


def choose_partner(late: SlcAcquisition, candidates: list[SlcAcquisition]) -> tuple[SlcAcquisition, int] | None:
    """The earlier acquisition ``late`` is paired with, and the gap: the shortest gap that exists
    (6 before 12: less temporal decorrelation), then the largest footprint overlap (the same slice
    rather than a neighbouring one on the track), then the time closest to the whole gap, then the
    lowest id (deterministic)."""
    best: tuple[tuple[int, float, float, int], SlcAcquisition, int] | None = None
    for c in candidates:
        gap = coherence_gap(c, late)
        if gap is None:
            continue
        off = abs((late.acquired_at - c.acquired_at) - timedelta(days=gap)).total_seconds()
        key = (gap, -c.footprint.intersection(late.footprint).area, off, c.id)
        if best is None or key < best[0]:
            best = (key, c, gap)
    return None if best is None else (best[1], best[2])


def _slc(row: tuple[Any, ...]) -> SlcAcquisition:
    return SlcAcquisition(int(row[0]), None if row[1] is None else int(row[1]), row[2], shapely.from_wkb(bytes(row[3])))


def _neighbours(cur: psycopg2.extensions.cursor, of: SlcAcquisition, direction: int) -> list[SlcAcquisition]:
    """Live SLC inputs of the same orbit whose footprint meets ``of``'s, before (``direction`` −1) or
    after (+1) it by at most the longest gap plus the tolerance (the rule itself is :func:`coherence_gap`)."""
    reach = timedelta(days=max(COH_GAPS_DAYS)) + COH_TOLERANCE
    lo, hi = (of.acquired_at - reach, of.acquired_at) if direction < 0 else (of.acquired_at, of.acquired_at + reach)
    cur.execute(
        "SELECT id, relative_orbit, acquired_at, ST_AsBinary(footprint) FROM card_inputs"
        " WHERE kind = 'slc' AND deleted_at IS NULL AND id <> %s AND relative_orbit = %s"
        " AND acquired_at BETWEEN %s AND %s AND ST_Intersects(footprint, ST_GeomFromWKB(%s, 4326)) ORDER BY id",
        (of.id, of.relative_orbit, lo, hi, psycopg2.Binary(shapely.to_wkb(of.footprint))),
    )
    return [_slc(r) for r in cur.fetchall()]


def _coh_job(cur: psycopg2.extensions.cursor, late_id: int) -> bool:
    """Pair one SLC input (locked) with its best predecessor and write its ``GenerateCard(coh)``,
    unless a job of it is still pending in the outbox; returns whether a job was written. The pair
    and the gap are recorded on the input (``partner_input_id``, ``gap_days``): the job reads them there."""
    cur.execute(
        "SELECT id, relative_orbit, acquired_at, ST_AsBinary(footprint), product_id, location FROM card_inputs"
        " WHERE id = %s AND kind = 'slc' AND deleted_at IS NULL FOR UPDATE",
        (late_id,),
    )
    row = cur.fetchone()
    if row is None or row[1] is None:
        return False
    late = _slc(row)
    chosen = choose_partner(late, _neighbours(cur, late, -1))
    if chosen is None:
        return False
    early, gap = chosen
    cur.execute(
        "UPDATE card_inputs SET partner_input_id = %s, gap_days = %s, updated_at = now() WHERE id = %s"
        " RETURNING (SELECT location FROM card_inputs WHERE id = %s)",
        (early.id, gap, late_id, early.id),
    )
    found = cur.fetchone()
    assert found is not None
    msg = GenerateCard(
        card_input_id=late_id,
        product_id=str(row[4]),
        card="coh",
        location=str(row[5]),
        partner_input_id=early.id,
        partner_location=str(found[0]),
    )
    cur.execute("SELECT 1 FROM outbox WHERE message_id = %s AND published_at IS NULL", (msg.message_id,))
    if cur.fetchone() is not None:
        return False
    enqueue(cur, msg)
    log.info("watch.coh_paired", card_input_id=late_id, partner_input_id=early.id, gap_days=gap)
    return True


def pair_slc(cur: psycopg2.extensions.cursor, input_id: int) -> int:
    """Coherence jobs an SLC input just recorded (new, changed or superseded) makes possible, in the
    caller's transaction; returns how many were written.

    * Its own ``GenerateCard(coh)``, when the previous acquisition of its relative orbit is recorded
      (:func:`choose_partner`; none: it waits in ``awaiting_card`` without a job).
    * A late arrival: a successor 6 or 12 days later that is waiting without a partner gets its job
      now (with its best predecessor, which may be this one).
    * A changed product: the successors paired with it are reset (generation bumped, lease cleared,
      back to ``awaiting_card``) and get their job again, their coherence having been made from the
      previous version.
    * A shorter gap: a successor paired 12 days back that this acquisition, 6 days before it, gives
      a 6-day pair is reset and paired again (less decorrelation, and JRC's ``tstype=c6`` serves
      6-day pairs only); its 12-day scenes stay. A pair is never redone for an equal or longer gap.

    No job is written while one of the same input is still pending in the
    outbox, so a re-scan or a second change does not pile jobs up.
    """
    written = int(_coh_job(cur, input_id))
    cur.execute(
        "SELECT id, relative_orbit, acquired_at, ST_AsBinary(footprint) FROM card_inputs WHERE id = %s", (input_id,)
    )
    row = cur.fetchone()
    if row is None or row[1] is None:
        return written
    this = _slc(row)
    gaps = {s.id: gap for s in _neighbours(cur, this, +1) if (gap := coherence_gap(this, s)) is not None}
    cur.execute(
        "SELECT id, partner_input_id, gap_days FROM card_inputs WHERE id = ANY(%s) AND kind = 'slc'"
        " AND deleted_at IS NULL",
        (list(gaps),),
    )
    waiting, shorter = [], []
    for succ, partner, gap_days in cur.fetchall():
        if partner is None:
            waiting.append(int(succ))
        elif int(partner) != input_id and gap_days is not None and gaps[int(succ)] < int(gap_days):
            shorter.append(int(succ))
    # Reset (generation bumped, lease cleared): the successors made from this input, whose product
    # may have changed, and those it gives a shorter gap (a 6-day predecessor arriving after a
    # 12-day pair was made: their c12 scenes stay, the c6 ones JRC's tstype=c6 serves are made).
    cur.execute(
        "UPDATE card_inputs SET status = 'awaiting_card', generation = generation + 1, lease_owner = NULL,"
        " lease_until = NULL, reason = NULL, updated_at = now()"
        " WHERE (partner_input_id = %s OR id = ANY(%s)) AND kind = 'slc' AND deleted_at IS NULL RETURNING id",
        (input_id, shorter),
    )
    reset = [int(r[0]) for r in cur.fetchall()]
    if shorter:
        log.info("watch.coh_shorter_pair", card_input_id=input_id, successors=sorted(shorter))
    for succ in sorted(set(reset + waiting)):
        written += int(_coh_job(cur, succ))
    return written


def record_rejected(cur: psycopg2.extensions.cursor, source: str, item: Rejected) -> None:
    cur.execute(
        """
        INSERT INTO rejected_items (source, collection, item_id, reason) VALUES (%s, %s, %s, %s)
        ON CONFLICT (source, collection, item_id) DO UPDATE
           SET reason = EXCLUDED.reason, last_seen = now(), seen_count = rejected_items.seen_count + 1
        """,
        (source, item.collection, item.item_id, item.reason),
    )


def aoi_key(aoi: BaseGeometry) -> str:
    """Cursors are per AOI union: a new or changed AOI starts from the acquisition lookback."""
    return hashlib.sha256(shapely.to_wkb(shapely.normalize(aoi))).hexdigest()[:16]


def read_cursor(cur: psycopg2.extensions.cursor, source: str, collection: str, aoi: str) -> datetime | None:
    cur.execute(
        "SELECT published_hwm FROM watch_cursors WHERE source = %s AND collection = %s AND aoi_key = %s",
        (source, collection, aoi),
    )
    row = cur.fetchone()
    return row[0] if row else None


def advance_cursor(cur: psycopg2.extensions.cursor, source: str, collection: str, aoi: str, to: datetime) -> None:
    cur.execute(
        """
        INSERT INTO watch_cursors (source, collection, aoi_key, published_hwm) VALUES (%s, %s, %s, %s)
        ON CONFLICT (source, collection, aoi_key) DO UPDATE
           SET published_hwm = GREATEST(watch_cursors.published_hwm, EXCLUDED.published_hwm), updated_at = now()
        """,
        (source, collection, aoi, to),
    )


def _scan(
    conn: psycopg2.extensions.connection,
    src: Source,
    collection: str,
    aoi: BaseGeometry,
    settings: WatchSettings,
    report: WatchReport,
    now: datetime,
) -> None:
    """One (source, collection) scan: each candidate in its own transaction with the cursor.

    The cursor moves to a candidate's publication time in the transaction that records it, so a
    crash or a budget stop resumes at the last committed item (minus the overlap). It never moves
    past an offline product: that one is re-read every poll until it comes online.
    """
    key = aoi_key(aoi)
    with conn, conn.cursor() as cur:
        hwm = read_cursor(cur, src.name, collection, key) if src.incremental else None
    since = hwm - timedelta(seconds=settings.overlap_s) if hwm is not None else None
    acquired_since = now - timedelta(days=settings.lookback_days) if settings.lookback_days > 0 else None
    held = False
    for cand in src.poll(collection, aoi, since, acquired_since):
        report.seen += 1
        with conn, conn.cursor() as cur:
            if isinstance(cand, Rejected):
                record_rejected(cur, src.name, cand)
                report.rejected.append(f"{src.name}/{collection}/{cand.item_id}: {cand.reason}")
                log.warning(
                    "watch.item_rejected",
                    source=src.name,
                    collection=collection,
                    item_id=cand.item_id,
                    reason=cand.reason,
                )
            elif isinstance(cand, Offline):
                held = True
                report.offline += 1
                log.info("watch.item_offline", source=src.name, collection=collection, item_id=cand.item_id)
            elif cand.is_card_input:
                input_id, what = upsert_card_input(cur, cand, src.name, src.store)
                report.card_inputs[what] = report.card_inputs.get(what, 0) + 1
                if what in ("new", "changed", "superseded"):
                    log.info(
                        f"watch.card_input_{what}",
                        card_input_id=input_id,
                        product_id=cand.product_id,
                        kind=cand.card,
                        source=src.name,
                    )
            else:
                scene_id, what = upsert_scene(cur, cand, src.name, src.store)
                if what in ("new", "changed", "superseded"):
                    setattr(report, what, getattr(report, what) + 1)
                    log.info(f"watch.scene_{what}", scene_id=scene_id, product_id=cand.product_id, source=src.name)
                elif what == "duplicate":
                    report.duplicates += 1
            if src.incremental and not held and cand.published is not None:
                advance_cursor(cur, src.name, collection, key, cand.published)


def _sweep_deleted(
    conn: psycopg2.extensions.connection,
    src: Source,
    collection: str,
    aoi: BaseGeometry,
    settings: WatchSettings,
    report: WatchReport,
    now: datetime,
) -> None:
    """Mark scenes whose product the catalogue deleted (OData ``DeletedProducts``).

    The scene and its rows are kept (``deleted_at`` set): the data already extracted stays valid
    until a superseding product replaces it. The sweep has its own cursor (``<collection>#deleted``).
    """
    deleted = getattr(src, "deleted", None)
    if deleted is None:
        return
    key, cursor_name = aoi_key(aoi), f"{collection}#deleted"
    with conn, conn.cursor() as cur:
        hwm = read_cursor(cur, src.name, cursor_name, key)
    since = (
        hwm - timedelta(seconds=settings.overlap_s)
        if hwm is not None
        else now - timedelta(days=settings.lookback_days or 3650)
    )
    for name, when in deleted(collection, since):
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE scenes SET deleted_at = %s WHERE product_id = %s AND deleted_at IS NULL RETURNING id",
                (when, name),
            )
            row = cur.fetchone()
            if row is not None:
                report.deleted += 1
                log.info("watch.scene_product_deleted", scene_id=int(row[0]), product_id=name, source=src.name)
            cur.execute(
                "UPDATE card_inputs SET deleted_at = %s, updated_at = now()"
                " WHERE product_id = %s AND deleted_at IS NULL RETURNING id",
                (when, name),
            )
            row = cur.fetchone()
            if row is not None:
                report.deleted += 1
                log.info("watch.card_input_product_deleted", card_input_id=int(row[0]), product_id=name)
            advance_cursor(cur, src.name, cursor_name, key, when)


def _sweep_gone(
    conn: psycopg2.extensions.connection,
    src: Source,
    collection: str,
    aoi: BaseGeometry,
    settings: WatchSettings,
    report: WatchReport,
    now: datetime,
) -> None:
    """Mark scenes whose item a STAC source no longer lists (a STAC API has no deletion feed).

    At most once per ``deleted_sweep_s`` per (source, collection, AOI), the whole acquisition
    window is listed (same query as a poll, without the publication filter: ceil(items / page
    size) requests, counted in the source's request budget). Only a complete listing concludes:
    a failed request or a spent budget raises out of :meth:`list_ids` before anything is marked,
    and a listing shorter than the server's ``numberMatched`` is discarded. A scene is marked when
    its source and collection are these, it lies in the AOI and at least a day inside the window
    (acquisition times from names and from item datetimes may differ at the edge), it existed
    before the listing began, and its product id is not listed. Rows are kept (``deleted_at``),
    as for OData; a newer baseline that supersedes the product clears the mark.
    """
    list_ids = getattr(src, "list_ids", None)
    if list_ids is None or settings.deleted_sweep_s < 0:
        return
    key = aoi_key(aoi)
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT listed_at FROM watch_listings WHERE source = %s AND collection = %s AND aoi_key = %s",
            (src.name, collection, key),
        )
        row = cur.fetchone()
    if row is not None and (now - row[0]).total_seconds() < settings.deleted_sweep_s:
        return
    acquired_since = now - timedelta(days=settings.lookback_days) if settings.lookback_days > 0 else None
    started = datetime.now(UTC)
    listed = list_ids(collection, aoi, acquired_since)
    if listed is None:
        log.warning("watch.listing_incomplete", source=src.name, collection=collection)
        return
    ids = sorted({i.removesuffix(".SAFE") for i in listed})
    since = acquired_since + timedelta(days=1) if acquired_since is not None else datetime.min.replace(tzinfo=UTC)
    wkb = psycopg2.Binary(shapely.to_wkb(aoi))
    with conn, conn.cursor() as cur:
        for table, event in (("scenes", "watch.scene_item_gone"), ("card_inputs", "watch.card_input_item_gone")):
            cur.execute(
                sql.SQL(
                    "UPDATE {} SET deleted_at = %s WHERE source = %s AND collection = %s AND deleted_at IS NULL"
                    " AND acquired_at >= %s AND created_at < %s"
                    " AND ST_Intersects(footprint, ST_GeomFromWKB(%s, 4326)) AND NOT (product_id = ANY(%s))"
                    " RETURNING id, product_id"
                ).format(sql.Identifier(table)),
                (started, src.name, collection, since, started, wkb, ids),
            )
            for row_id, product_id in cur.fetchall():
                report.deleted += 1
                log.info(event, row_id=int(row_id), product_id=product_id, source=src.name, collection=collection)
        cur.execute(
            """
            INSERT INTO watch_listings (source, collection, aoi_key, listed_at, items) VALUES (%s, %s, %s, %s, %s)
            ON CONFLICT (source, collection, aoi_key) DO UPDATE
               SET listed_at = EXCLUDED.listed_at, items = EXCLUDED.items
            """,
            (src.name, collection, key, started, len(ids)),
        )


def watch_once(
    dsn: str | None = None,
    bus: BusSettings | None = None,
    settings: WatchSettings | None = None,
    stop: threading.Event | None = None,
    sources: list[Source] | None = None,
) -> WatchReport:
    bus = bus or BusSettings()
    settings = settings or WatchSettings()
    dsn = dsn or DbSettings().resolved_dsn()
    report = WatchReport()
    now = datetime.now(UTC)
    with db.transaction(dsn) as cur:
        aoi = load_aoi_union(cur)
    try:
        if aoi is None:
            log.warning("watch.no_aoi")
        else:
            conn = db.connect(dsn)
            try:
                for src in sources if sources is not None else make_sources(settings, stop):
                    for collection in src.collections:
                        try:
                            _scan(conn, src, collection, aoi, settings, report, now)
                            _sweep_deleted(conn, src, collection, aoi, settings, report, now)
                            _sweep_gone(conn, src, collection, aoi, settings, report, now)
                        except (psycopg2.Error, WatchStopped):
                            raise
                        except Exception as exc:  # noqa: BLE001 - one source down must not stop the others
                            if stop is not None and stop.is_set():
                                raise WatchStopped("stopped") from exc
                            report.errors.append(f"{src.name}/{collection}: {type(exc).__name__}: {exc}")
                            log.error(
                                "watch.scan_failed",
                                source=src.name,
                                collection=collection,
                                error=str(exc),
                                error_type=type(exc).__name__,
                            )
                    if src.session is not None:
                        report.requests[src.name] = src.session.requests_sent
                    with conn, conn.cursor() as cur:
                        cur.execute(
                            "SELECT extract(epoch FROM now() - min(published_hwm)) FROM watch_cursors"
                            " WHERE source = %s",
                            (src.name,),
                        )
                        lag = cur.fetchone()
                        if lag is not None and lag[0] is not None:
                            report.cursor_lag_s[src.name] = float(lag[0])
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
        superseded=report.superseded,
        duplicates=report.duplicates,
        rejected=len(report.rejected),
        offline=report.offline,
        deleted=report.deleted,
        card_inputs=report.card_inputs,
        published=report.published,
        pending=report.pending,
        errors=len(report.errors),
        requests=report.requests,
    )
    if report.errors:
        raise ScanFailed(report)
    return report
