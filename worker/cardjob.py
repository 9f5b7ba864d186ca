"""``GenerateCard(bs)``: one Sentinel-1 GRD → backscatter COGs per MGRS tile → ``bs`` scenes whose
extraction is queued.

The job follows the extraction job's rules (``worker/consumer.py``, docs/reliability.md):

* **Claim with a lease** on the ``card_inputs`` row (``processing``, ``lease_owner``, ``lease_until``,
  ``generation``). A redelivered job whose input is ``done`` is acknowledged without work; one whose
  input is under another worker's live lease waits for it.
* **Work outside any transaction.** The GRD is read (an ``s3://`` product is first downloaded to
  a scratch directory: see :func:`local_safe`), the COGs are generated tile by tile into scratch and
  published to the CARD store (``CBMFLOW_WORKER_CARD_OUTPUT_URL``) under a path that names the
  input's generation, then the scratch copy is deleted, so the disk holds the GRD and one tile's
  outputs at a time.
* **One short transaction** then registers one ``bs`` scene per tile (an upsert keyed on the
  acquisition and tile, so a re-run updates its scenes and never adds one), writes each scene's
  ``ExtractParcels`` to the outbox, and marks the input ``done``; it commits only if the worker
  still holds the lease on the generation it claimed (checked under ``FOR UPDATE``).

Grid: the output of a tile is on that tile's own 10 m lattice (``card.mgrs.tile_geobox``), so S1
and S2 pixels of a parcel coincide. With ``CBMFLOW_WORKER_CARD_EXTENT=aoi`` (the default) only the
window of the tile that covers the AOIs under the GRD (plus ``card_margin_m``) is generated: a whole
109.8 km tile costs minutes of CPU per polarisation and is mostly outside any AOI. ``tile``
generates the whole tile.

Each tile is published as one COG per polarisation, the layover/shadow mask, the local incidence
angle and a small STAC Item (``<scene product id>.json``, assets ``vv``/``vh`` with relative
hrefs); the scene's location is that Item, which the worker's ``bs`` path already reads
(``card/s1rtc.py``), from local disk or S3 alike.

Errors: a GRD that cannot be read or processed (missing files, bad XML, a corrupt measurement) is
permanent (``PermanentJobError``: failed with the reason, dead-lettered); a store that cannot be
reached (:class:`cbmflow.store.StoreUnavailable`) is retried in place by the consumer; anything
else is transient (requeued with backoff up to the delivery limit).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import psycopg2
import psycopg2.extensions
import shapely
from pyproj import Transformer
from shapely.geometry import box, mapping
from shapely.geometry.base import BaseGeometry

from card.geobox import GeoBox
from cbmflow import __version__, store
from cbmflow.errors import ConfigError, PermanentJobError
from cbmflow.logging import get_logger
from cbmflow.messages import ExtractParcels, GenerateCard
from cbmflow.outbox import enqueue
from cbmflow.settings import StoreSettings, WorkerSettings, state_dir
from cbmflow.vocab import CardKind
from worker.leases import LeaseHeld, LeaseLost, SceneChanged

log = get_logger("worker")
T = TypeVar("T")

SAFE_PARTS = ("manifest.safe", "annotation/", "measurement/")
"""What CARD-BS reads of a SAFE on S3: the manifest, the annotation (calibration and noise
included) and the measurements; previews and support files are left where they are."""


class UnknownCardInput(PermanentJobError):
    """The job names a card input the database does not have (a foreign or stale message)."""


class UnsupportedCardJob(PermanentJobError):
    """A CARD job for an input of the wrong kind (bs needs a GRD, coh an SLC)."""


@dataclass(frozen=True)
class ClaimedInput:
    id: int
    product_id: str
    product_name: str
    kind: str
    location: str
    mission: str
    acquired_at: datetime
    generation: int
    store_profile: str


@dataclass(frozen=True)
class TileOutput:
    """One generated tile, published: its scene's identity, where its Item is, what it covers."""

    tile: str
    product_id: str
    acq_key: str
    location: str
    footprint: BaseGeometry
    """lon/lat: the generated grid's extent within the GRD's footprint."""

    @property
    def folder(self) -> str:
        """Where the tile's COGs and Item were published."""
        return self.location.rsplit("/", 1)[0]


@dataclass(frozen=True)
class TileGrid:
    tile: str
    grid: GeoBox
    whole: bool


class CardJobs:
    """Database side of a CARD job: claim with a lease, renew it, finish or fail the input."""

    def __init__(self, dsn: str, me: str, settings: WorkerSettings) -> None:
        self.dsn = dsn
        self.me = me
        self.settings = settings

    def claim(self, conn: psycopg2.extensions.connection, msg: GenerateCard) -> ClaimedInput | None:
        """Claim the input, or None when it is already done (a duplicate job).

        Like :meth:`worker.consumer.SceneJobs.claim`: an expired lease is taken over, a live one
        raises :class:`LeaseHeld`, our own is re-claimed (a job retried in place).
        """
        wanted = {"bs": "grd", "coh": "slc"}[msg.card]  # coh: worker/cardjob_coh.py runs it
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE card_inputs SET status = 'processing', lease_owner = %(me)s,"
                "       lease_until = now() + make_interval(secs => %(lease)s), attempts = attempts + 1,"
                "       updated_at = now(), reason = NULL"
                " WHERE id = %(id)s AND (status IN ('awaiting_card', 'queued', 'failed')"
                "       OR (status = 'processing' AND (lease_until < now() OR lease_owner = %(me)s)))"
                " RETURNING product_id, product_name, kind, location, mission, acquired_at, generation,"
                "           coalesce(store_profile, '')",
                {"me": self.me, "lease": self.settings.lease_s, "id": msg.card_input_id},
            )
            row = cur.fetchone()
            if row is not None:
                claimed = ClaimedInput(msg.card_input_id, *row)
                if claimed.kind != wanted:
                    raise UnsupportedCardJob(
                        f"card input {claimed.id} is a {claimed.kind}: GenerateCard({msg.card}) needs a {wanted}"
                    )
                return claimed
            cur.execute(
                "SELECT status, extract(epoch FROM lease_until - now()) FROM card_inputs WHERE id = %s",
                (msg.card_input_id,),
            )
            found = cur.fetchone()
        if found is None:
            raise UnknownCardInput(f"unknown card input {msg.card_input_id}")
        status, remaining = found
        if status == "done":
            return None
        raise LeaseHeld(float(remaining or 0.0))

    def renew(self, conn: psycopg2.extensions.connection, input_id: int) -> bool:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE card_inputs SET lease_until = now() + make_interval(secs => %s)"
                " WHERE id = %s AND lease_owner = %s AND status = 'processing'",
                (self.settings.lease_s, input_id, self.me),
            )
            return bool(cur.rowcount == 1)

    def note(self, conn: psycopg2.extensions.connection, claimed: ClaimedInput, reason: str) -> None:
        """Show why a job we still hold is waiting (``card_inputs.reason``), keeping the input."""
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE card_inputs SET reason = %s, updated_at = now()"
                " WHERE id = %s AND lease_owner = %s AND generation = %s AND status = 'processing'",
                (reason[:2000], claimed.id, self.me, claimed.generation),
            )

    def fail(
        self,
        conn: psycopg2.extensions.connection,
        input_id: int,
        reason: str,
        permanent: bool,
        generation: int | None = None,
    ) -> None:
        """``failed`` for good, or back to ``queued`` for the next delivery; an input the watcher reset
        meanwhile (a new version with its own job) is left alone."""
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE card_inputs SET status = %s, reason = %s, lease_owner = NULL, lease_until = NULL,"
                " updated_at = now() WHERE id = %s AND (lease_owner = %s OR lease_owner IS NULL)"
                " AND status <> 'done' AND (%s::bigint IS NULL OR generation = %s)",
                ("failed" if permanent else "queued", reason[:2000], input_id, self.me, generation, generation),
            )

    def run(self, conn: psycopg2.extensions.connection, claimed: ClaimedInput) -> dict[str, Any]:
        """Generate and publish every tile outside any transaction, then register the scenes, queue
        their extraction and mark the input done in ONE short transaction (see the module docstring)."""
        require_profile(claimed.id, claimed.product_id, claimed.store_profile)
        footprint, region = outside_transaction(conn, lambda cur: _footprint_and_aoi(cur, claimed.id))
        grids = tile_grids(region, footprint, self.settings) if region is not None else []
        outputs: list[TileOutput] = []
        if grids:
            root = output_root(self.settings)
            with scratch_dir(self.settings) as scratch:
                with store.using_profile(claimed.store_profile):
                    grd = local_safe(claimed.location, claimed.product_id, scratch / "input")
                for tg in grids:
                    outputs.append(_generate_tile(claimed, grd, tg, footprint, scratch / "out", root, self.settings))
        scene_ids = self.finish(conn, claimed, outputs, "bs")
        return {
            "status": "done",
            "tiles": [o.tile for o in outputs],
            "scenes": scene_ids,
            "aoi": region is not None,
        }

    def finish(
        self, conn: psycopg2.extensions.connection, claimed: ClaimedInput, outputs: list[TileOutput], card: CardKind
    ) -> list[int]:
        """Register the published tiles' scenes, queue their extraction and mark the input done, in
        one short transaction that commits only while the input is still ours at its generation."""
        with conn, conn.cursor() as cur:
            self._check_current(cur, claimed, lock=True)
            scene_ids = [register_scene(cur, claimed, out, card) for out in outputs]
            cur.execute(
                "UPDATE card_inputs SET status = 'done', lease_owner = NULL, lease_until = NULL, reason = NULL,"
                " scenes_written = %s, updated_at = now() WHERE id = %s",
                (len(outputs), claimed.id),
            )
        return scene_ids

    def _check_current(self, cur: psycopg2.extensions.cursor, claimed: ClaimedInput, *, lock: bool) -> None:
        if lock:
            cur.execute("SELECT lease_owner, generation FROM card_inputs WHERE id = %s FOR UPDATE", (claimed.id,))
        else:
            cur.execute("SELECT lease_owner, generation FROM card_inputs WHERE id = %s", (claimed.id,))
        row = cur.fetchone()
        if row is None or row[1] != claimed.generation:
            raise SceneChanged(f"card input {claimed.id} changed (generation {claimed.generation} -> {row and row[1]})")
        if row[0] != self.me:
            raise LeaseLost(0.0)


# --- geometry ------------------------------------------------------------------------------------


def _footprint_and_aoi(cur: psycopg2.extensions.cursor, input_id: int) -> tuple[BaseGeometry, BaseGeometry | None]:
    """The GRD's footprint and its intersection with the AOIs (None when it meets none)."""
    cur.execute(
        "SELECT ST_AsBinary(ci.footprint),"
        "       (SELECT ST_AsBinary(ST_Intersection(ci.footprint, ST_Union(a.geom)))"
        "          FROM aois a WHERE ST_Intersects(a.geom, ci.footprint))"
        "  FROM card_inputs ci WHERE ci.id = %s",
        (input_id,),
    )
    row = cur.fetchone()
    if row is None:
        raise UnknownCardInput(f"unknown card input {input_id}")
    footprint = shapely.from_wkb(bytes(row[0]))
    region = shapely.from_wkb(bytes(row[1])) if row[1] is not None else None
    if region is not None and (region.is_empty or region.area == 0):
        region = None
    return footprint, region


def _project(geom: BaseGeometry, src: str, dst: str) -> BaseGeometry:
    """Reproject with densified edges: a GRD footprint's sides are ~250 km long, straight in lon/lat."""
    step = 0.01 if src == "EPSG:4326" else 1000.0
    transformer = Transformer.from_crs(src, dst, always_xy=True)
    out = shapely.transform(shapely.segmentize(geom, step), transformer.transform, interleaved=False)
    return out if out.is_valid else out.buffer(0)


def tile_grids(region: BaseGeometry, footprint: BaseGeometry, settings: WorkerSettings) -> list[TileGrid]:
    """Per MGRS tile meeting ``region`` (lon/lat: the AOIs under the GRD), the grid to generate.

    ``tile`` extent: the whole tile. ``aoi``: the tile's window over ``region`` plus the margin,
    on the tile's 10 m lattice (its origin a whole number of pixels from the tile's), clipped to the tile.
    """
    from card import mgrs

    out: list[TileGrid] = []
    for name in _distinct_tiles(mgrs.tiles_intersecting(region), region):
        tile = mgrs.tile_geobox(name, resolution_m=10)
        crs = str(tile.crs)
        left, bottom, right, top = tile.bounds
        part = _project(region, "EPSG:4326", crs).intersection(box(left, bottom, right, top))
        if part.is_empty or part.area == 0:
            continue
        if settings.card_extent == "tile":
            out.append(TileGrid(name, tile, True))
            continue
        xmin, ymin, xmax, ymax = part.buffer(settings.card_margin_m).bounds
        res = tile.transform.a
        c0 = max(math.floor((xmin - left) / res), 0)
        c1 = min(math.ceil((xmax - left) / res), tile.width)
        r0 = max(math.floor((top - ymax) / res), 0)
        r1 = min(math.ceil((top - ymin) / res), tile.height)
        if c1 <= c0 or r1 <= r0:
            continue
        grid = tile[r0:r1, c0:c1]
        out.append(TileGrid(name, grid, grid.shape == tile.shape))
    return out


def _distinct_tiles(names: list[str], region: BaseGeometry) -> list[str]:
    """One name per tile grid: an MGRS square on a latitude-band boundary is a tile under two names
    with one grid (``32TPU`` and ``32UPU`` north of Munich); generating both would be the same COGs
    twice. The name whose band holds the region's centre is kept (the other's sorted first)."""
    from card import mgrs

    lat = region.centroid.y
    by_grid: dict[tuple[Any, ...], list[str]] = {}
    for name in names:
        box_ = mgrs.tile_geobox(name, resolution_m=10)
        by_grid.setdefault((box_.crs, tuple(box_.transform)[:6], box_.shape), []).append(name)
    kept = []
    for same in by_grid.values():
        south_north = [mgrs.band_latitudes(mgrs.parse_tile(n).band) for n in same]
        holding = [n for n, (s, nn) in zip(same, south_north, strict=True) if s <= lat < nn]
        kept.append(sorted(holding or same)[0])
    return sorted(kept)


def _grid_footprint(grid: GeoBox, footprint: BaseGeometry) -> BaseGeometry:
    """The grid's extent within the GRD footprint, lon/lat, as a (multi)polygon."""
    left, bottom, right, top = grid.bounds
    extent = _project(box(left, bottom, right, top), str(grid.crs), "EPSG:4326")
    covered = extent.intersection(footprint)
    polys = [g for g in getattr(covered, "geoms", [covered]) if g.geom_type == "Polygon" and not g.is_empty]
    return shapely.MultiPolygon(polys) if polys else extent


# --- input, scratch, output --------------------------------------------------------------------


@contextmanager
def scratch_dir(settings: WorkerSettings) -> Iterator[Path]:
    """A private directory for one job, removed afterwards whatever happens."""
    base = settings.card_scratch_dir or None
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="cbmflow-card-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def local_safe(location: str, product_id: str, into: Path) -> Path:
    """The input (a GRD, or one SLC of a coherence pair) as a local SAFE directory or zip: a local
    location as it is; an ``s3://`` one downloaded into ``into`` (the manifest, annotation and
    measurements only; a zip whole).

    Downloading rather than reading ``/vsis3/`` windows in place: the chain reads every radar
    window of every output block, overlapping ones several times, and ``card.s1grd`` opens
    local paths; a GRD is ~1 GB per polarisation (an SLC ~4), which the scratch directory holds
    for the job.
    A product that is not there or not a SAFE is permanent; an unreachable store is not.
    """
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else location)
        if not path.exists():
            raise PermanentJobError(f"unreadable SAFE {product_id}: {path} does not exist")
        return path
    if parsed.scheme != "s3":
        raise PermanentJobError(f"unreadable SAFE {product_id}: unsupported location {location!r}")
    bucket, key = store.parse_s3(location)
    key = key.removesuffix("/manifest.safe")
    client = store.s3_client()
    into.mkdir(parents=True, exist_ok=True)
    try:
        if key.lower().endswith(".zip"):
            target = into / key.rsplit("/", 1)[-1]
            _download(client, bucket, key, target)
            return target
        prefix = key.rstrip("/") + "/"
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", ())]
    except (FileNotFoundError, store.StoreRefused) as exc:
        raise PermanentJobError(f"unreadable SAFE {product_id} at {location}: {exc}") from exc
    except Exception as exc:
        failure = store.store_error(exc, location)
        if failure is None:
            raise
        if isinstance(failure, store.StoreUnavailable):
            raise failure from exc
        raise PermanentJobError(f"unreadable SAFE {product_id} at {location}: {failure}") from exc
    wanted = [k for k in keys if k[len(prefix) :].startswith(SAFE_PARTS)]
    if not any(k.endswith("/manifest.safe") for k in wanted):
        raise PermanentJobError(f"unreadable SAFE {product_id}: no manifest.safe under {location}")
    name = key.rstrip("/").rsplit("/", 1)[-1]
    root = into / (name if name.upper().endswith(".SAFE") else f"{name}.SAFE")
    for k in wanted:
        try:
            _download(client, bucket, k, root / k[len(prefix) :])
        except FileNotFoundError as exc:  # listed a moment ago: the product is being replaced
            raise store.StoreUnavailable(f"{location}: {exc}") from exc
    return root


def _download(client: Any, bucket: str, key: str, target: Path) -> None:
    url = store.s3_url(bucket, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            with open(target, "wb") as fh:
                shutil.copyfileobj(body, fh, 8 << 20)
        finally:
            body.close()
    except Exception as exc:
        failure = store.store_error(exc, url)
        if failure is None:
            raise
        raise failure from exc


def output_root(settings: WorkerSettings) -> str:
    """Where CARD products are published: ``card_output_url``, else ``CBMFLOW_STORE_URL``, else
    ``<state dir>/store``."""
    root = settings.card_output_url or StoreSettings().url or str(state_dir() / "store")
    return root.rstrip("/")


def _publish(files: list[Path], dest: str) -> None:
    """Copy finished files to ``dest`` (a local directory or ``s3://`` prefix), each appearing whole.

    Local: written beside their final name and renamed. S3: one PUT per object (atomic). The
    default store's settings are used: the scenes registered from them carry no store profile.
    """
    if store.is_s3(dest):
        bucket, prefix = store.parse_s3(dest)
        client = store.s3_client(store.profile_settings(""))
        for f in files:
            key = f"{prefix}/{f.name}"
            try:
                with open(f, "rb") as fh:
                    client.put_object(Bucket=bucket, Key=key, Body=fh)
            except Exception as exc:
                failure = store.store_error(exc, store.s3_url(bucket, key))
                if failure is None:
                    raise
                raise failure from exc
        return
    target = Path(urlparse(dest).path if dest.startswith("file://") else dest)
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        part = target / f".{f.name}.{os.getpid()}.part"
        shutil.copyfile(f, part)
        os.replace(part, target / f.name)


COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


def tile_item(
    claimed: ClaimedInput,
    out_id: str,
    tile: str,
    grid: GeoBox,
    footprint: BaseGeometry,
    assets: dict[str, Any],
    properties: dict[str, Any],
) -> dict[str, Any]:
    """A STAC Item for one tile's CARD COGs (relative hrefs: it lives beside them), as the worker's
    Item reader (``card.s1rtc``) reads them back; ``properties`` add the product's own (``sar:*``, ...)."""
    epsg = int(str(grid.crs).split(":")[-1])
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
        ],
        "id": out_id,
        "geometry": mapping(footprint),
        "bbox": list(footprint.bounds),
        "properties": {
            "datetime": claimed.acquired_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "platform": f"sentinel-{claimed.mission[1:].lower()}"
            if claimed.mission.startswith("S1")
            else claimed.mission,
            "constellation": "sentinel-1",
            "grid:code": f"MGRS-{tile}",
            "proj:epsg": epsg,
            "proj:shape": list(grid.shape),
            "proj:transform": list(grid.transform)[:6],
            "cbmflow:card_input": claimed.product_id,
            **properties,
            "processing:software": {"cbmflow": __version__},
        },
        "assets": assets,
        "links": [],
    }


def _item(
    claimed: ClaimedInput, out_id: str, tile: str, grid: GeoBox, footprint: BaseGeometry, files: dict[str, str]
) -> dict[str, Any]:
    cog = COG_TYPE
    assets: dict[str, Any] = {
        pol.lower(): {"href": f"./{name}", "type": cog, "roles": ["data"], "title": f"{pol} backscatter (linear)"}
        for pol, name in files.items()
        if pol not in ("MASK", "LIA")
    }
    assets["mask"] = {
        "href": f"./{files['MASK']}",
        "type": cog,
        "roles": ["metadata"],
        "title": "layover/shadow/no data bits",
    }
    assets["lia"] = {
        "href": f"./{files['LIA']}",
        "type": cog,
        "roles": ["metadata"],
        "title": "local incidence angle (degrees)",
    }
    properties = {"sar:polarizations": [p for p in files if p not in ("MASK", "LIA")], "sar:product_type": "GRD"}
    return tile_item(claimed, out_id, tile, grid, footprint, assets, properties)


def _dem(settings: WorkerSettings) -> Any:
    """The DEM provider of ``CBMFLOW_WORKER_CARD_DEM``: flat, glo30 (S3 tiles, cached) or a raster file.

    A DEM that cannot be set up (a missing file or geoid grid) is the worker's configuration, not
    the product's: it raises ``ConfigError``, which the consumer treats as transient (requeued, the
    input kept), so fixing the setting lets the backlog through.
    """
    from card.s1grd.dem import FileDem, FlatDem, Glo30Dem
    from worker.cardopts import glo30_client

    spec = settings.card_dem
    geoid = settings.card_dem_geoid or None
    try:
        if spec == "flat":
            return FlatDem()
        if spec == "glo30":
            bucket = settings.card_dem_bucket
            cache = settings.card_dem_cache_dir or str(state_dir() / "glo30")
            return Glo30Dem(glo30_client(bucket, profile=""), cache, bucket, geoid=geoid)
        if not Path(spec).is_file():
            raise FileNotFoundError(f"DEM {spec} not found")
        return FileDem(Path(spec), geoid)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"CBMFLOW_WORKER_CARD_DEM={spec!r}: {exc}") from exc


def _generate_tile(
    claimed: ClaimedInput,
    grd: Path,
    tg: TileGrid,
    footprint: BaseGeometry,
    scratch: Path,
    root: str,
    settings: WorkerSettings,
) -> TileOutput:
    """Generate one tile's COGs into scratch, publish them and their Item, free the scratch space."""
    from card.s1grd.bs import generate_bs

    tile, name, work = tile_work(tg, scratch)
    dem = _dem(settings)
    with generation_errors(f"CARD-BS of {claimed.product_id} on tile {tile}", settings):
        result = generate_bs(
            str(grd),
            tg.grid,
            dem,
            str(work),
            quantity=settings.card_quantity,
            denoise=settings.card_denoise,
            name=name,
            software=f"cbmflow {__version__}",
            workers=settings.card_threads,
        )
    files = {pol: Path(p).name for pol, p in result.backscatter.items()}
    files["MASK"] = Path(result.mask).name
    files["LIA"] = Path(result.local_incidence).name
    out = publish_tile(
        claimed,
        tg,
        footprint,
        work,
        files,
        product_id=f"{claimed.product_name}_{tile}_BS",
        card="bs",
        root=root,
        item=lambda out_id, geom: _item(claimed, out_id, tile, tg.grid, geom, files),
    )
    log.info("card.tile_done", tile=tile, pixels=result.pixels, seconds=round(result.seconds, 2), location=out.folder)
    return out


def require_profile(input_id: int, product_id: str, profile: str) -> None:
    """An input whose store profile this worker lacks fails for good: no retry can read it."""
    try:
        store.profile_settings(profile)
    except store.UnknownStoreProfile as exc:
        raise PermanentJobError(f"card input {input_id} ({product_id}): {exc}") from exc


def outside_transaction(conn: psycopg2.extensions.connection, read: Callable[[psycopg2.extensions.cursor], T]) -> T:
    """``read`` in autocommit: a CARD job runs for minutes and must hold no transaction meanwhile."""
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            return read(cur)
    finally:
        if not conn.closed:
            conn.autocommit = False


def tile_work(tg: TileGrid, scratch: Path) -> tuple[str, str, Path]:
    """The tile's name without its T, its outputs' file stem (the grid's extent when not the
    whole tile) and its scratch folder."""
    from card.s1grd.bs import grid_name

    tile = tg.tile.removeprefix("T")
    return tile, f"T{tile}" if tg.whole else f"T{tile}-{grid_name(tg.grid)}", scratch / tile


def publish_tile(
    claimed: ClaimedInput,
    tg: TileGrid,
    footprint: BaseGeometry,
    work: Path,
    files: dict[str, str],
    *,
    product_id: str,
    card: str,
    root: str,
    item: Callable[[str, BaseGeometry], dict[str, Any]],
) -> TileOutput:
    """Publish one tile's COGs, then their STAC Item (last: it names files that are all there), and
    free the scratch space. ``card`` (bs, c6, c12) names the output folder's kind and the scene's
    acquisition key, so a re-run of the same input replaces the same scene."""
    tile = tg.tile.removeprefix("T")
    tile_footprint = _grid_footprint(tg.grid, footprint)
    item_path = work / f"{product_id}.json"
    item_path.write_text(json.dumps(item(product_id, tile_footprint), indent=1))
    kind = "bs" if card == "bs" else "coh"
    dest = f"{root}/card/{kind}/{claimed.product_name}/g{claimed.generation}/{tile}"
    _publish([work / n for n in files.values()], dest)
    _publish([item_path], dest)
    shutil.rmtree(work, ignore_errors=True)
    acq_key = f"{claimed.mission}_{card}_{tile}_{claimed.acquired_at.astimezone(UTC):%Y%m%dT%H%M%S}"
    return TileOutput(tile, product_id, acq_key, f"{dest}/{product_id}.json", tile_footprint)


@contextmanager
def generation_errors(what: str, settings: WorkerSettings) -> Iterator[None]:
    """The CARD physics' errors as job errors: a bad product is permanent; a DEM location holding no
    tiles, or a DEM bucket refusing us, is the worker's configuration (every product would fail
    alike: requeued, not failed); a DEM bucket out of reach is retried in place like any store."""
    import rasterio.errors

    from card.s1grd.dem import DemLocationError
    from card.s1grd.safe import SafeError

    try:
        yield
    except DemLocationError as exc:
        raise ConfigError(f"CBMFLOW_WORKER_CARD_DEM_BUCKET: {exc}") from exc
    except (SafeError, ValueError, FileNotFoundError, rasterio.errors.RasterioIOError) as exc:
        raise PermanentJobError(f"{what} failed: {exc}") from exc
    except Exception as exc:
        failure = store.store_error(exc, settings.card_dem_bucket)
        if failure is None:
            raise
        if isinstance(failure, store.StoreUnavailable):
            raise failure from exc
        raise ConfigError(f"CBMFLOW_WORKER_CARD_DEM_BUCKET: {failure}") from exc


def register_scene(cur: psycopg2.extensions.cursor, claimed: ClaimedInput, out: TileOutput, card: CardKind) -> int:
    """Upsert the tile's CARD scene (``bs``, ``c6``, ``c12``) by its acquisition key and queue its
    extraction (in the caller's transaction). An existing scene (a re-run, a changed input) is
    re-pointed and reset with its generation bumped, so an extraction of the previous output cannot
    commit."""
    cur.execute(
        """
        INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint, location,
                            acq_key, card_input_id, source_updated)
        VALUES (%s, %s, %s, 'C-SAR', %s, %s, ST_Multi(ST_GeomFromWKB(%s, 4326)), %s, %s, %s, %s)
        ON CONFLICT (acq_key) DO UPDATE
           SET product_id = EXCLUDED.product_id, product_name = EXCLUDED.product_name,
               location = EXCLUDED.location, footprint = EXCLUDED.footprint,
               card_input_id = EXCLUDED.card_input_id, source_updated = EXCLUDED.source_updated,
               store_profile = NULL, deleted_at = NULL, status = 'discovered', reason = NULL,
               generation = scenes.generation + 1, lease_owner = NULL, lease_until = NULL, updated_at = now()
        RETURNING id
        """,
        (
            out.product_id,
            out.product_id,
            claimed.mission,
            card,
            claimed.acquired_at,
            psycopg2.Binary(shapely.to_wkb(out.footprint)),
            out.location,
            out.acq_key,
            claimed.id,
            f"card-input {claimed.id} generation {claimed.generation}",
        ),
    )
    row = cur.fetchone()
    assert row is not None
    scene_id = int(row[0])
    enqueue(cur, ExtractParcels(scene_id=scene_id, product_id=out.product_id, card=card, location=out.location))
    return scene_id
