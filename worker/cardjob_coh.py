"""``GenerateCard(coh)``: an SLC and the previous acquisition of its relative orbit → coherence COGs per
MGRS tile → ``c6``/``c12`` scenes whose extraction is queued.

The pair is the watcher's (``catalog_watcher.service.pair_slc``): the claimed input is the later
SLC, ``card_inputs.partner_input_id`` the earlier one and ``gap_days`` the recorded gap (6 or 12),
read from the row rather than from the message, so a job published before a re-pairing runs the
current pair. Everything else is the ``GenerateCard(bs)`` job's (``worker/cardjob.py``), reused:

* the claim, lease, heartbeat and generation (:class:`worker.cardjob.CardJobs`; the later input is
  the one claimed, its generation is bumped when it or its partner changes);
* the grids: the AOIs under **both** footprints, per MGRS tile on the tile's own 10 m lattice
  (:func:`worker.cardjob.tile_grids`), so a parcel's S1 coherence, S1 backscatter and S2 pixels are
  the same pixels;
* the inputs: local SAFEs in place, ``s3://`` ones downloaded to scratch (each with its own store
  profile), removed after the job;
* publishing to the CARD store under ``card/coh/<late product>/g<generation>/<tile>/``: one COG per
  polarisation (``card.s1slc.coh.generate_coh``, its tags naming both dates, the gap and the window)
  and a STAC Item with assets ``vv``/``vh``, which the extraction reads with the per-polarisation
  Item reader (``card/s1rtc.py``) into ``VVc``/``VHc``;
* one transaction, only while the lease on the claimed generation holds: one ``c6``/``c12`` scene
  per tile upserted on its acquisition key ``<mission>_c<gap>_<tile>_<late start>`` (a re-run
  updates, never adds), its ``ExtractParcels`` in the outbox, the input ``done``.

A scene's acquisition time is the later date's: the coherence says what changed up to it.

Errors as for bs: an SLC that cannot be read, a pair whose products disagree with the recorded gap
or an input without a partner is permanent (failed with the reason, dead-lettered); an unreachable
store is retried in place; a DEM that cannot be set up is the worker's configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import shapely
from shapely.geometry.base import BaseGeometry

from card.geobox import GeoBox
from cbmflow import __version__, store
from cbmflow.errors import PermanentJobError
from cbmflow.logging import get_logger
from cbmflow.settings import WorkerSettings
from cbmflow.vocab import CardKind
from worker.cardjob import (
    COG_TYPE,
    CardJobs,
    ClaimedInput,
    TileGrid,
    TileOutput,
    UnknownCardInput,
    _dem,
    generation_errors,
    local_safe,
    output_root,
    outside_transaction,
    publish_tile,
    require_profile,
    scratch_dir,
    tile_grids,
    tile_item,
    tile_work,
)

log = get_logger("worker")


@dataclass(frozen=True)
class Partner:
    """The earlier SLC of the pair, as the watcher recorded it."""

    id: int
    product_id: str
    product_name: str
    location: str
    store_profile: str
    gap_days: int


class CardJobsWithCoh(CardJobs):
    """:class:`CardJobs` that also runs coherence: an SLC input's job goes to :meth:`run_coh`."""

    def run(self, conn: psycopg2.extensions.connection, claimed: ClaimedInput) -> dict[str, Any]:
        if claimed.kind == "slc":
            return self.run_coh(conn, claimed)
        return super().run(conn, claimed)

    def run_coh(self, conn: psycopg2.extensions.connection, claimed: ClaimedInput) -> dict[str, Any]:
        """Generate and publish every tile's coherence outside any transaction, then register the
        scenes, queue their extraction and mark the input done in ONE short transaction."""
        require_profile(claimed.id, claimed.product_id, claimed.store_profile)
        partner, overlap, region = outside_transaction(conn, lambda cur: _pair_and_aoi(cur, claimed.id))
        require_profile(partner.id, partner.product_id, partner.store_profile)
        card: CardKind = "c6" if partner.gap_days == 6 else "c12"
        grids = tile_grids(region, overlap, self.settings) if region is not None else []
        outputs: list[TileOutput] = []
        if grids:
            root = output_root(self.settings)
            with scratch_dir(self.settings) as scratch:
                with store.using_profile(claimed.store_profile):
                    late = local_safe(claimed.location, claimed.product_id, scratch / "late")
                with store.using_profile(partner.store_profile):
                    early = local_safe(partner.location, partner.product_id, scratch / "early")
                for tg in grids:
                    outputs.append(
                        _generate_tile(claimed, partner, early, late, tg, overlap, scratch / "out", root, self.settings)
                    )
        scene_ids = self.finish(conn, claimed, outputs, card)
        return {
            "status": "done",
            "card": card,
            "partner_input_id": partner.id,
            "tiles": [o.tile for o in outputs],
            "scenes": scene_ids,
            "aoi": region is not None,
        }


def _pair_and_aoi(cur: psycopg2.extensions.cursor, input_id: int) -> tuple[Partner, BaseGeometry, BaseGeometry | None]:
    """The partner, the two footprints' overlap and its intersection with the AOIs (None: none)."""
    cur.execute(
        "WITH pair AS (SELECT p.id, p.product_id, p.product_name, p.location, coalesce(p.store_profile, '') AS profile,"
        "                     ci.gap_days, ST_Intersection(ci.footprint, p.footprint) AS overlap"
        "                FROM card_inputs ci JOIN card_inputs p ON p.id = ci.partner_input_id"
        "               WHERE ci.id = %s AND p.deleted_at IS NULL)"
        " SELECT pair.id, product_id, product_name, location, profile, gap_days, ST_AsBinary(overlap),"
        "        (SELECT ST_AsBinary(ST_Intersection(pair.overlap, ST_Union(a.geom)))"
        "           FROM aois a WHERE ST_Intersects(a.geom, pair.overlap))"
        "   FROM pair",
        (input_id,),
    )
    row = cur.fetchone()
    if row is None:
        cur.execute("SELECT 1 FROM card_inputs WHERE id = %s", (input_id,))
        if cur.fetchone() is None:
            raise UnknownCardInput(f"unknown card input {input_id}")
        raise PermanentJobError(
            f"card input {input_id} has no (live) earlier acquisition to pair with: coherence needs one"
        )
    if row[5] not in (6, 12):
        raise PermanentJobError(f"card input {input_id}: recorded gap {row[5]!r} is not 6 or 12 days")
    partner = Partner(int(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]), int(row[5]))
    overlap = shapely.from_wkb(bytes(row[6]))
    region = shapely.from_wkb(bytes(row[7])) if row[7] is not None else None
    if region is not None and (region.is_empty or region.area == 0):
        region = None
    return partner, overlap, region


def _threads(settings: WorkerSettings) -> int:
    """``card_threads``, 0 meaning every CPU this process may use."""
    return settings.card_threads or len(os.sched_getaffinity(0))


def _item(
    claimed: ClaimedInput,
    partner: Partner,
    out_id: str,
    tile: str,
    grid: GeoBox,
    footprint: BaseGeometry,
    files: dict[str, str],
    gap: int,
) -> dict[str, Any]:
    assets = {
        pol.lower(): {
            "href": f"./{name}",
            "type": COG_TYPE,
            "roles": ["data"],
            "title": f"{pol} {gap}-day interferometric coherence (0..1)",
        }
        for pol, name in files.items()
    }
    properties = {
        "sar:polarizations": list(files),
        "sar:product_type": "SLC",
        "cbmflow:partner_input": partner.product_id,
        "cbmflow:gap_days": gap,
    }
    return tile_item(claimed, out_id, tile, grid, footprint, assets, properties)


def _generate_tile(
    claimed: ClaimedInput,
    partner: Partner,
    early: Path,
    late: Path,
    tg: TileGrid,
    footprint: BaseGeometry,
    scratch: Path,
    root: str,
    settings: WorkerSettings,
) -> TileOutput:
    """One tile's coherence COGs into scratch, published with their Item; the scratch space freed."""
    from card.s1slc.coh import generate_coh

    tile, name, work = tile_work(tg, scratch)
    dem = _dem(settings)
    what = f"CARD-COH of {partner.product_id} and {claimed.product_id} on tile {tile}"
    with generation_errors(what, settings):
        result = generate_coh(
            str(early),
            str(late),
            tg.grid,
            dem,
            str(work),
            workers=_threads(settings),
            name=name,
            software=f"cbmflow {__version__}",
        )
    if result.gap_days != partner.gap_days:
        raise PermanentJobError(
            f"{partner.product_id} and {claimed.product_id} are {result.gap_days} days apart, the catalogue"
            f" said {partner.gap_days}"
        )
    gap = partner.gap_days
    files = {pol: Path(p).name for pol, p in result.coherence.items()}
    out = publish_tile(
        claimed,
        tg,
        footprint,
        work,
        files,
        product_id=f"{claimed.product_name}_{tile}_COH{gap}",
        card=f"c{gap}",
        root=root,
        item=lambda out_id, geom: _item(claimed, partner, out_id, tile, tg.grid, geom, files, gap),
    )
    log.info(
        "card.coh_tile_done",
        tile=tile,
        gap_days=gap,
        pixels=result.pixels,
        seconds=round(result.seconds, 2),
        location=out.folder,
    )
    return out
