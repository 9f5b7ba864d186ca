"""A deterministic, format-faithful test world with ground truth.

cbmflow's chain (STAC → watcher → worker → PostGIS → API) must be checked against numbers that do
not come from the extractor itself. This module writes, for one seed:

* ``aoi.geojson`` and ``parcels.gpkg`` (EPSG:3035, like a national LPIS) with field-like parcels,
  MultiPolygons, holes and a few deliberately invalid bow-ties (``invalid_parcels.txt``);
* ``products/<name>.SAFE``: Sentinel-2 L2A products in the real SAFE layout (baseline 05.10, so
  DN = reflectance·10000 + 1000), lossless JPEG2000 on the real 32UPU tile grid, cropped to the AOI;
* optionally (``s1_scenes``, ``c6_scenes``) ``products/<name>.tif``: Sentinel-1 CARD products in
  cbmflow's CARD format (one COG per scene, float32, NaN nodata, bands described ``VV``/``VH``):
  linear backscatter (``bs``, 10 m, with speckle) and 6-day coherence (``c6``, 20 m, in [0, 1],
  written VH first, since readers must go by the descriptions), on grids that cut through the
  AOI (a swath edge), with no-data blocks and scattered NaN (shadow/layover masks);
* ``stac/``: a self-contained static STAC catalogue pointing at those products (collections
  ``sentinel-2-l2a``, ``sentinel-1-card-bs``, ``sentinel-1-card-c6``);
* ``truth.csv`` / ``truth_scl.csv``: per (parcel, product, band) pixel counts and means, computed
  from the generator's own pixel-centre point-in-polygon labels and the values it wrote (S1
  bands as the database names them: ``VVb``, ``VHb``, ``VVc``, ``VHc``).

The truth deliberately avoids ``rasterio.features.rasterize`` and rasterstats, so that the tests
comparing the two are evidence rather than a tautology. Pixel membership follows the usual rule
(centre strictly inside; holes excluded; all parts of a MultiPolygon), and the generator nudges any
parcel whose boundary passes within :data:`EDGE_GUARD_M` of a pixel centre, so the answer does not
depend on sub-millimetre differences between PROJ versions (pyproj here, PostGIS in the chain).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pyogrio
import pystac
import rasterio
import shapely
import shapely.affinity
import shapely.geometry
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.transform import Affine

from card.geobox import GeoBox
from card.testworld_grd import (
    BackscatterField,
    GrdAcquisition,
    SyntheticGrd,
    grd_collection,
    relative_to_absolute_orbit,
    write_grd,
)
from card.testworld_grd import write_truth as write_grd_truth

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

TILE_ID = "32UPU"
"""A real MGRS tile (Bavaria, north of Munich) with its true origin (card.mgrs.tile_geobox("32UPU")):
S2 corners sit on the UTM zone's 60 m lattice counted from the equator, which 5 400 000 already is;
other tiles' are not round (32TPP: ULY 4 900 020), so the crops below stay on that lattice."""
TILE_EPSG = 32632
TILE_ULX_M = 600000
TILE_ULY_M = 5400000
TILE_SIZE_M = 109800
PARCELS_EPSG = 3035
"""ETRS89-LAEA, as national LPIS data often is: the extractor must reproject parcels to UTM."""
MISSION = "S2B"
RELATIVE_ORBIT = 65
PROCESSING_BASELINE = "05.10"
BOA_ADD_OFFSET = -1000
QUANTIFICATION_VALUE = 10000
MAX_DN = 32767
BANDS_BY_RESOLUTION_M: dict[int, tuple[str, ...]] = {10: ("B02", "B03", "B04", "B08"), 20: ("B05", "B11", "SCL")}
TRUTH_BANDS = ("B02", "B03", "B04", "B05", "B08", "B11")
PSD_BAND_IDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")

CELL_M = 250.0
"""Grid spacing of the field layout; one parcel (or a gap) per cell."""
FIELD_MARGIN_M = 10.0
"""Minimum distance from a field to its cell edge, so neighbours never touch (field roads)."""
GAP_FRACTION = 0.12
MIN_AREA_M2 = 5_000.0
MAX_AREA_M2 = 50_000.0
EDGE_GUARD_M = 0.01
"""No pixel centre may lie closer than this to a parcel boundary (see the module docstring)."""
NUDGE_M = 0.5
EXTENT_MARGIN_M = 240.0
"""Raster beyond the AOI, so the product footprint contains the AOI with room to spare."""
GRID_ALIGN_M = 60
"""Crops start on a multiple of 60 m from the tile origin, so the 10, 20 and 60 m grids nest."""
BLOCK_ROWS = 512
SEASON_START = (4, 1)
SEASON_DAYS = 183

CLOUD_THIN, CLOUD_MEDIUM, CLOUD_HIGH, SHADOW_MIN = 0.25, 0.4, 0.65, 0.4

S1_MISSION = "S1A"
S1_RELATIVE_ORBIT = 117
"""A descending track over the tile (morning pass, about 05:25 UTC)."""
S1_REPEAT_DAYS = 12
S1_MAX_SCENES = SEASON_DAYS // S1_REPEAT_DAYS
S1_COLLECTIONS = {"bs": "sentinel-1-card-bs", "c6": "sentinel-1-card-c6"}
S1_BANDS: dict[str, tuple[tuple[str, str], ...]] = {
    "bs": (("VV", "VVb"), ("VH", "VHb")),
    "c6": (("VH", "VHc"), ("VV", "VVc")),  # written VH first on purpose: order is never assumed
}
"""Per card: (band description in the COG, band name in the truth and the database), in file order."""
S1_RESOLUTION_M = {"bs": 10, "c6": 20}
S1_ENL = 4.9
"""Equivalent number of looks of the backscatter speckle (gamma-distributed, mean 1)."""
S1_COHERENCE_SD = 0.06
S1_MASKED_FRACTION = 0.002
"""Share of pixels set to NaN at random (radar shadow / layover masks)."""
S1_EDGE_FRACTION = 0.2
"""Share of the AOI grid each S1 product misses: the west columns (bs), the south rows (c6)."""
SCL_VEGETATION_COVER = 0.35

# Reflectance of the scene's end-members and per-pixel noise (sd), per band:
# bare soil, full green canopy, open water, opaque cloud.
_SPECTRA: dict[str, tuple[float, float, float, float, float]] = {
    "B02": (0.065, 0.025, 0.045, 0.42, 0.004),
    "B03": (0.095, 0.065, 0.050, 0.43, 0.004),
    "B04": (0.130, 0.030, 0.035, 0.44, 0.004),
    "B05": (0.165, 0.110, 0.025, 0.45, 0.005),
    "B08": (0.230, 0.460, 0.012, 0.48, 0.006),
    "B11": (0.290, 0.170, 0.006, 0.33, 0.006),
}

_SIMPLE, _MULTI, _HOLE, _INVALID = 0, 1, 2, 3


# --- crops and phenology ------------------------------------------------------------------------


def _double_logistic(
    doy: FloatArray, *, base: float, peak: float, sos: float, up_d: float, eos: float, down_d: float
) -> FloatArray:
    rise = 1.0 / (1.0 + np.exp(-(doy - sos) / up_d))
    fall = 1.0 / (1.0 + np.exp(-(doy - eos) / down_d))
    return base + (peak - base) * (rise - fall)


def _dips(doy: FloatArray, centres_doy: tuple[float, ...], depth: float, width_d: float) -> FloatArray:
    out = np.zeros_like(doy)
    for c in centres_doy:
        out += depth * np.exp(-0.5 * ((doy - c) / width_d) ** 2)
    return out


def _grassland(doy: FloatArray) -> FloatArray:
    """Meadow: green all season, with three mowing dips (mid May, early July, late August)."""
    return 0.74 + 0.08 * np.sin(2 * np.pi * (doy - 100) / 365) - _dips(doy, (138.0, 186.0, 240.0), 0.45, 6.0)


def _rapeseed(doy: FloatArray) -> FloatArray:
    """Winter rapeseed: green early, a flowering dip in May (yellow petals), harvest in July."""
    green = _double_logistic(doy, base=0.1, peak=0.86, sos=68, up_d=8, eos=186, down_d=5)
    return green - _dips(doy, (127.0,), 0.28, 8.0)


@dataclass(frozen=True)
class Crop:
    code: int
    name: str
    share: float
    cover: Callable[[FloatArray], FloatArray]
    """Green-cover fraction (0 = bare soil, 1 = full canopy) by day of year; NDVI follows from it."""


CROPS: tuple[Crop, ...] = (
    Crop(115, "winter wheat", 0.25, partial(_double_logistic, base=0.08, peak=0.9, sos=80, up_d=9, eos=193, down_d=5)),
    Crop(411, "maize", 0.20, partial(_double_logistic, base=0.06, peak=0.93, sos=172, up_d=8, eos=266, down_d=7)),
    Crop(459, "grassland", 0.25, _grassland),
    Crop(603, "sugar beet", 0.10, partial(_double_logistic, base=0.05, peak=0.9, sos=158, up_d=9, eos=300, down_d=10)),
    Crop(602, "potato", 0.10, partial(_double_logistic, base=0.06, peak=0.86, sos=150, up_d=7, eos=222, down_d=6)),
    Crop(311, "winter rapeseed", 0.10, _rapeseed),
)


# --- public result ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldSummary:
    out: Path
    aoi_path: Path
    parcels_path: Path
    invalid_parcels_path: Path
    stac_catalog_path: Path
    truth_path: Path
    truth_scl_path: Path
    n_parcels: int
    n_invalid: int
    products: tuple[str, ...]
    product_paths: tuple[Path, ...]
    parcels_epsg: int
    raster_epsg: int
    tile_id: str
    aoi_bbox: tuple[float, float, float, float]
    """AOI (west, south, east, north) in degrees."""
    truth_rows: int
    s1_products: tuple[str, ...] = ()
    """Sentinel-1 CARD products (``bs`` then ``c6``), by name; empty unless asked for."""
    s1_product_paths: tuple[Path, ...] = ()
    earth_search_item_paths: tuple[Path, ...] = ()
    """With ``earth_search_items``: per SAFE (in order), its ``sentinel-2-l2a`` then ``sentinel-2-c1-l2a`` Item."""
    s1_rtc_item_paths: tuple[Path, ...] = ()
    """With ``earth_search_items``: per CARD ``bs`` product, a ``sentinel-1-rtc``-shaped Item."""
    grd_products: tuple[str, ...] = ()
    """With ``grd_scenes``: Sentinel-1 IW GRDH products (CARD inputs), by name."""
    grd_product_paths: tuple[Path, ...] = ()
    """Their ``.SAFE`` directories, under ``products/s1``."""
    truth_grd_path: Path | None = None
    """With ``grd_scenes``: ``truth_grd.csv``, the γ0 per (parcel, GRD product, VVb/VHb)."""


# --- internal model -----------------------------------------------------------------------------


@dataclass
class _Parcels:
    ids: list[str]
    crop_index: IntArray
    geoms: npt.NDArray[np.object_]
    """EPSG:3035, as written to the GeoPackage."""
    kind: IntArray
    shift_d: FloatArray
    vigour: FloatArray
    soil_brightness: FloatArray

    @property
    def valid(self) -> BoolArray:
        return np.asarray(self.kind != _INVALID)


@dataclass
class _World:
    seed: int
    parcels: _Parcels
    valid_index: IntArray
    """Parcel index (into ``parcels``) of label value k+1."""
    grids: dict[int, GeoBox]
    labels: dict[int, npt.NDArray[np.int32]]
    background_phase: FloatArray
    lakes: FloatArray
    """(n, 4): centre x, centre y, semi-axes (m), in the raster CRS."""


@dataclass(frozen=True)
class _ProductPlan:
    index: int
    sensing: datetime
    generated: datetime
    abs_orbit: int
    doy: float
    sun_zenith_deg: float
    sun_azimuth_deg: float
    clouds: FloatArray
    """(n, 4): centre x, centre y, sigma (m), amplitude."""
    shadow_offset_m: tuple[float, float]
    texture_phase: tuple[float, float]
    nodata_strip: bool
    nodata_patch: tuple[float, float, float, float] | None

    @property
    def name(self) -> str:
        return (
            f"{MISSION}_MSIL2A_{self.sensing:%Y%m%dT%H%M%S}_N{PROCESSING_BASELINE.replace('.', '')}"
            f"_R{RELATIVE_ORBIT:03d}_T{TILE_ID}_{self.generated:%Y%m%dT%H%M%S}"
        )

    @property
    def granule(self) -> str:
        datastrip_start = self.sensing - timedelta(seconds=6)
        return f"L2A_T{TILE_ID}_A{self.abs_orbit:06d}_{datastrip_start:%Y%m%dT%H%M%S}"

    def image_stem(self, band: str, res: int) -> str:
        return f"T{TILE_ID}_{self.sensing:%Y%m%dT%H%M%S}_{band}_{res}m"


@dataclass
class _Truth:
    counts: dict[str, IntArray] = field(default_factory=dict)
    sums: dict[str, FloatArray] = field(default_factory=dict)
    scl: IntArray | None = None
    scl_histogram: IntArray = field(default_factory=lambda: np.zeros(16, dtype=np.int64))


@dataclass(frozen=True)
class _S1Plan:
    """One Sentinel-1 CARD product: backscatter of one date, or coherence of a 6-day pair."""

    card: str
    index: int
    start: datetime
    """Acquisition start (coherence: of the secondary, later date)."""
    reference: datetime | None
    """Coherence only: the first date of the pair (6 days earlier, the other satellite)."""
    abs_orbit: int
    datatake: int
    unique: int
    moisture_db: float
    """Backscatter: the date's soil-moisture offset, added to every VV/VH level (dB)."""
    grid: GeoBox
    nodata_patch: tuple[float, float, float, float] | None

    @property
    def name(self) -> str:
        kind = "GRDH" if self.card == "bs" else "SLC_"
        suffix = "CARD_BS" if self.card == "bs" else "CARD_COH6"
        stop = self.start + timedelta(seconds=25)
        return (
            f"{S1_MISSION}_IW_{kind}_1SDV_{self.start:%Y%m%dT%H%M%S}_{stop:%Y%m%dT%H%M%S}"
            f"_{self.abs_orbit:06d}_{self.datatake:06X}_{self.unique:04X}_{suffix}"
        )

    @property
    def doy(self) -> float:
        return float(self.start.timetuple().tm_yday)


# --- entry point --------------------------------------------------------------------------------


def generate(
    out: Path,
    parcels: int = 300,
    scenes: int = 10,
    seed: int = 0,
    aoi_name: str = "ms",
    year: int = 2024,
    s1_scenes: int = 0,
    c6_scenes: int = 0,
    earth_search_items: bool = False,
    grd_scenes: int = 0,
) -> WorldSummary:
    """Write a complete test world under ``out`` (see the module docstring); same seed, same bytes.

    ``s1_scenes`` Sentinel-1 CARD backscatter and ``c6_scenes`` coherence products are added on
    the same parcels (none by default). The S2 products, parcels and truth rows of a seed do not
    depend on them.

    ``earth_search_items`` also writes every S2 acquisition as per-band COGs with an earth-search
    Item in both flavours, and every ``bs`` product as per-polarisation COGs with a
    ``sentinel-1-rtc`` Item, under ``out/products/earth-search`` (:func:`write_earth_search_item`,
    :func:`write_s1_rtc_item`); nothing else changes (same bytes without it).

    ``out/products`` and ``out/stac`` are replaced, so that products of an earlier, larger world
    cannot linger in the catalogue.

    ``grd_scenes`` Sentinel-1 IW GRDH products (SAFE, ``products/s1``, collection
    ``sentinel-1-grd``: inputs of CARD-BS generation) are rendered by
    :mod:`card.testworld_grd` from the ``bs`` level model on 12-day cycles the ``bs`` products
    leave free, with their truth in ``truth_grd.csv`` (not ``truth.csv``: CARD-BS output equals
    it within quantisation on interior pixels only). None by default; nothing else changes.
    """
    if parcels < 1:
        raise ValueError("parcels must be at least 1")
    if seed < 0:
        raise ValueError("seed must be non-negative")
    if not 1 <= scenes <= SEASON_DAYS:
        raise ValueError(f"scenes must be between 1 and {SEASON_DAYS} (one per day of the season at most)")
    for label, n in (("s1_scenes", s1_scenes), ("c6_scenes", c6_scenes)):
        if not 0 <= n <= S1_MAX_SCENES:
            raise ValueError(f"{label} must be between 0 and {S1_MAX_SCENES} (one per {S1_REPEAT_DAYS}-day cycle)")
    if not 0 <= grd_scenes <= S1_MAX_SCENES - s1_scenes:
        raise ValueError(f"grd_scenes must be between 0 and {S1_MAX_SCENES} - s1_scenes (cycles of their own)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for owned in (out / "products", out / "stac"):
        if owned.exists():
            shutil.rmtree(owned)
    layout_rng, product_rng, world_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    to_utm = Transformer.from_crs(PARCELS_EPSG, TILE_EPSG, always_xy=True)
    to_3035 = Transformer.from_crs(TILE_EPSG, PARCELS_EPSG, always_xy=True)
    to_wgs84 = Transformer.from_crs(PARCELS_EPSG, 4326, always_xy=True)
    centre = to_3035.transform(TILE_ULX_M + TILE_SIZE_M / 2, TILE_ULY_M - TILE_SIZE_M / 2)
    world_parcels, aoi_3035 = _layout_parcels(parcels, layout_rng, float(centre[0]), float(centre[1]))
    grid10 = _crop_grid(_reproject(aoi_3035, to_utm))
    grids = {res: _scaled_grid(grid10, res) for res in (10, 20)}
    labels = _settle_and_label(world_parcels, grids, to_utm, layout_rng)
    world = _World(
        seed=seed,
        parcels=world_parcels,
        valid_index=np.flatnonzero(world_parcels.valid),
        grids=grids,
        labels=labels,
        background_phase=world_rng.uniform(0, 2 * np.pi, 2),
        lakes=_lakes(grid10, world_rng),
    )

    aoi_wgs84 = _reproject(aoi_3035, to_wgs84)
    aoi_path = _write_aoi(out / "aoi.geojson", aoi_wgs84, aoi_name)
    parcels_path = _write_parcels(out / "parcels.gpkg", world_parcels)
    invalid_ids = [world_parcels.ids[i] for i in np.flatnonzero(~world_parcels.valid)]
    invalid_path = out / "invalid_parcels.txt"
    invalid_path.write_text("".join(f"{pid}\n" for pid in invalid_ids))

    footprint = _footprint_wgs84(grid10)
    plans = _plan_products(scenes, year, grid10, product_rng)
    products_dir = out / "products"
    truths: list[_Truth] = []
    safe_dirs: list[Path] = []
    for plan in plans:
        safe = products_dir / f"{plan.name}.SAFE"
        truth = _render_product(plan, world, safe / "GRANULE" / plan.granule / "IMG_DATA")
        _write_safe_metadata(safe, plan, grid10, footprint, truth)
        truths.append(truth)
        safe_dirs.append(safe)

    s1_plans = _plan_s1(s1_scenes, c6_scenes, year, world, np.random.default_rng(np.random.SeedSequence([seed, 1])))
    s1_files: list[Path] = []
    s1_truths: list[_Truth] = []
    for s1_plan in s1_plans:
        tif = products_dir / f"{s1_plan.name}.tif"
        s1_truths.append(_render_s1(s1_plan, world, tif))
        s1_files.append(tif)

    grds = _write_grds(grd_scenes, year, world, s1_plans, products_dir / "s1", out / "truth_grd.csv")
    catalog_path = _write_stac(
        out / "stac", plans, safe_dirs, truths, footprint, aoi_name, list(zip(s1_plans, s1_files, strict=True)), grds
    )
    truth_rows = _write_truth(out / "truth.csv", out / "truth_scl.csv", world, plans, truths)
    truth_rows += _append_s1_truth(out / "truth.csv", world, s1_plans, s1_truths)
    es_items: list[Path] = []
    rtc_items: list[Path] = []
    if earth_search_items:
        es_dir = products_dir / "earth-search"
        es_items = [write_earth_search_item(p, es_dir, f) for p in safe_dirs for f in EARTH_SEARCH_FLAVOURS]
        rtc_items = [write_s1_rtc_item(f, es_dir) for p, f in zip(s1_plans, s1_files, strict=True) if p.card == "bs"]
    west, south, east, north = (float(v) for v in aoi_wgs84.bounds)
    return WorldSummary(
        out=out,
        aoi_path=aoi_path,
        parcels_path=parcels_path,
        invalid_parcels_path=invalid_path,
        stac_catalog_path=catalog_path,
        truth_path=out / "truth.csv",
        truth_scl_path=out / "truth_scl.csv",
        n_parcels=parcels,
        n_invalid=len(invalid_ids),
        products=tuple(p.name for p in plans),
        product_paths=tuple(safe_dirs),
        parcels_epsg=PARCELS_EPSG,
        raster_epsg=TILE_EPSG,
        tile_id=TILE_ID,
        aoi_bbox=(west, south, east, north),
        truth_rows=truth_rows,
        s1_products=tuple(p.name for p in s1_plans),
        s1_product_paths=tuple(s1_files),
        earth_search_item_paths=tuple(es_items),
        s1_rtc_item_paths=tuple(rtc_items),
        grd_products=tuple(g.name for g in grds),
        grd_product_paths=tuple(g.safe for g in grds),
        truth_grd_path=out / "truth_grd.csv" if grds else None,
    )


# --- parcels ------------------------------------------------------------------------------------


def _layout_parcels(n: int, rng: np.random.Generator, centre_x: float, centre_y: float) -> tuple[_Parcels, Any]:
    """Fields on a jittered grid of cells, with gaps; returns the parcels and the AOI (EPSG:3035).

    Coordinates are random floats (random rotation, jitter and area), so vertices never sit on
    pixel edges or centres systematically.
    """
    n_cells = math.ceil(n / (1 - GAP_FRACTION))
    ncols = math.ceil(math.sqrt(n_cells))
    nrows = math.ceil(n_cells / ncols)
    cells = np.sort(rng.choice(nrows * ncols, size=n, replace=False))
    left = centre_x - ncols * CELL_M / 2
    top = centre_y + nrows * CELL_M / 2
    cx = left + (cells % ncols + 0.5) * CELL_M
    cy = top - (cells // ncols + 0.5) * CELL_M

    kind = np.full(n, _SIMPLE, dtype=np.int64)
    n_invalid = max(2, round(0.01 * n)) if n >= 4 else 0
    n_special = max(1, round(0.05 * n)) if n >= 10 else 0
    perm = rng.permutation(n)
    kind[perm[:n_invalid]] = _INVALID
    kind[perm[n_invalid : n_invalid + n_special]] = _MULTI
    kind[perm[n_invalid + n_special : n_invalid + 2 * n_special]] = _HOLE
    shares = np.array([c.share for c in CROPS])
    crop_index = rng.choice(len(CROPS), size=n, p=shares / shares.sum()).astype(np.int64)

    area = np.exp(rng.uniform(math.log(MIN_AREA_M2), math.log(MAX_AREA_M2), n))
    area = np.where((kind == _MULTI) | (kind == _HOLE), np.maximum(area, 15_000.0), area)
    aspect = rng.uniform(1.0, 2.5, n)
    width = np.sqrt(area * aspect)
    height = area / width
    unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    quads = unit[None] * np.stack([width, height], axis=1)[:, None, :]
    quads += np.clip(rng.normal(0.0, 1.0, (n, 4, 2)), -2.0, 2.0) * (0.035 * height)[:, None, None]
    quads *= np.sqrt(area / _ring_area(quads))[:, None, None]
    cut = (kind == _SIMPLE) & (rng.random(n) < 0.3)
    corner = rng.integers(0, 4, n)
    cut_at = rng.uniform(0.15, 0.35, (n, 2))

    theta = np.radians(rng.uniform(-10.0, 10.0, n))
    cos, sin = np.cos(theta), np.sin(theta)
    rx = quads[..., 0] * cos[:, None] - quads[..., 1] * sin[:, None]
    ry = quads[..., 0] * sin[:, None] + quads[..., 1] * cos[:, None]
    limit = CELL_M / 2 - FIELD_MARGIN_M - NUDGE_M
    reach_x, reach_y = np.abs(rx).max(axis=1), np.abs(ry).max(axis=1)
    fit = np.minimum(1.0, limit / np.maximum(reach_x, reach_y))
    quads *= fit[:, None, None]
    cx = cx + rng.uniform(-1.0, 1.0, n) * (limit - reach_x * fit)
    cy = cy + rng.uniform(-1.0, 1.0, n) * (limit - reach_y * fit)

    geoms = np.empty(n, dtype=object)
    plain = (kind == _SIMPLE) & ~cut
    geoms[plain] = shapely.polygons(_place(quads[plain], cos[plain], sin[plain], cx[plain], cy[plain]))
    cornered = (kind == _SIMPLE) & cut
    pentagons = _cut_corner(quads[cornered], corner[cornered], cut_at[cornered])
    geoms[cornered] = shapely.polygons(_place(pentagons, cos[cornered], sin[cornered], cx[cornered], cy[cornered]))
    for i in np.flatnonzero(kind != _SIMPLE):
        geoms[i] = _field_geometry(quads[i], int(kind[i]), rng, (cos[i], sin[i], cx[i], cy[i]))
    parcels = _Parcels(
        ids=[f"P-{i + 1:06d}" for i in range(n)],
        crop_index=crop_index,
        geoms=geoms,
        kind=kind,
        shift_d=np.clip(rng.normal(0.0, 5.0, n), -12.0, 12.0),
        vigour=rng.uniform(0.9, 1.05, n),
        soil_brightness=rng.uniform(0.85, 1.15, n),
    )
    bottom, right = top - nrows * CELL_M, left + ncols * CELL_M
    aoi = shapely.segmentize(shapely.box(left - 50, bottom - 50, right + 50, top + 50), 500)
    return parcels, aoi


def _ring_area(rings: FloatArray) -> FloatArray:
    x, y = rings[..., 0], rings[..., 1]
    return np.asarray(0.5 * np.abs((x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y).sum(axis=-1)))


def _place(local: FloatArray, cos: FloatArray, sin: FloatArray, cx: FloatArray, cy: FloatArray) -> FloatArray:
    """Rotate field-local rings (m, k, 2) and move them to their cell positions."""
    x = local[..., 0] * cos[:, None] - local[..., 1] * sin[:, None] + cx[:, None]
    y = local[..., 0] * sin[:, None] + local[..., 1] * cos[:, None] + cy[:, None]
    return np.stack([x, y], axis=-1)


def _cut_corner(quads: FloatArray, corner: IntArray, cut_at: FloatArray) -> FloatArray:
    """Pentagons: one corner of each quadrilateral replaced by a short diagonal edge."""
    order = (np.arange(4)[None, :] + corner[:, None]) % 4
    q = quads[np.arange(len(quads))[:, None], order]
    first = q[:, 0] + cut_at[:, :1] * (q[:, 3] - q[:, 0])
    second = q[:, 0] + cut_at[:, 1:] * (q[:, 1] - q[:, 0])
    return np.stack([first, second, q[:, 1], q[:, 2], q[:, 3]], axis=1)


def _field_geometry(
    quad: FloatArray, kind: int, rng: np.random.Generator, placement: tuple[float, float, float, float]
) -> Any:
    """A special parcel (two-part, holed or bow-tie) in field-local coordinates, then placed."""
    cos, sin, cx, cy = placement
    if kind == _INVALID:
        local: Any = shapely.Polygon(quad[[0, 2, 1, 3]])  # a bow-tie: edges 0-2 and 1-3 cross
    else:
        local = shapely.Polygon(quad)
    if kind == _MULTI:
        split_x = rng.uniform(-0.2, 0.2) * float(np.ptp(quad[:, 0]))
        gap = rng.uniform(10.0, 16.0)
        big = 1e4
        parts = [
            local.intersection(shapely.box(-big, -big, split_x - gap / 2, big)),
            local.intersection(shapely.box(split_x + gap / 2, -big, big, big)),
        ]
        local = shapely.MultiPolygon(parts)
    elif kind == _HOLE:
        local = _with_hole(local, quad, rng)
    return shapely.affinity.affine_transform(local, [cos, -sin, sin, cos, cx, cy])


def _with_hole(shell: Any, quad: FloatArray, rng: np.random.Generator) -> Any:
    """A pond or tree clump inside the field: an interior ring well clear of the outer edge."""
    w, h = float(np.ptp(quad[:, 0])), float(np.ptp(quad[:, 1]))
    size = rng.uniform(0.12, 0.22) * h
    centre = (rng.uniform(-0.15, 0.15) * w, rng.uniform(-0.15, 0.15) * h)
    hole = shapely.affinity.rotate(
        shapely.box(-size, -0.7 * size, size, 0.7 * size), rng.uniform(0, 180), origin=(0, 0)
    )
    hole = shapely.affinity.translate(hole, *centre)
    inner = shell.buffer(-6.0)
    while not inner.contains(hole):
        hole = shapely.affinity.scale(hole, 0.7, 0.7, origin="centroid")
    return shapely.Polygon(shell.exterior.coords, [hole.exterior.coords])


def _reproject(geom: Any, transformer: Transformer) -> Any:
    return shapely.transform(geom, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def _settle_and_label(
    parcels: _Parcels, grids: dict[int, GeoBox], to_utm: Transformer, rng: np.random.Generator
) -> dict[int, npt.NDArray[np.int32]]:
    """Nudge parcels until no pixel centre is ambiguous, then label pixels by centre-in-polygon.

    A nudge re-places the parcel within :data:`NUDGE_M` of its original position (not cumulative),
    which the cell margin absorbs.
    """
    valid = np.flatnonzero(parcels.valid)
    original = parcels.geoms[valid].copy()
    pending = np.arange(len(valid))
    for _ in range(200):
        utm = _reproject(parcels.geoms[valid[pending]], to_utm)
        ambiguous = np.zeros(len(pending), dtype=bool)
        for grid in grids.values():
            ambiguous |= _near_boundary(utm, grid)
        pending = pending[ambiguous]
        if len(pending) == 0:
            break
        offsets = rng.uniform(-NUDGE_M, NUDGE_M, (len(pending), 2))
        pairs = zip(original[pending], offsets.tolist(), strict=True)
        moved = [shapely.affinity.translate(g, dx, dy) for g, (dx, dy) in pairs]
        parcels.geoms[valid[pending]] = moved
    else:
        raise RuntimeError(f"{len(pending)} parcels still have pixel centres on their boundary")
    utm = _reproject(parcels.geoms[valid], to_utm)
    shapely.prepare(utm)
    labels: dict[int, npt.NDArray[np.int32]] = {}
    for res, grid in grids.items():
        label = np.zeros((grid.height, grid.width), dtype=np.int32)
        for owner, rows, cols in _bbox_pixels(utm, grid):
            inside = shapely.contains_xy(utm[owner], *_centres(grid, rows, cols))
            label[rows[inside], cols[inside]] = (owner[inside] + 1).astype(np.int32)
        labels[res] = label
    return labels


def _near_boundary(geoms: npt.NDArray[np.object_], grid: GeoBox) -> BoolArray:
    """Which geometries have a pixel centre within EDGE_GUARD_M of their boundary (holes included)."""
    outer = shapely.buffer(geoms, EDGE_GUARD_M, join_style="mitre")
    inner = shapely.buffer(geoms, -EDGE_GUARD_M, join_style="mitre")
    shapely.prepare(outer)
    shapely.prepare(inner)
    near = np.zeros(len(geoms), dtype=bool)
    for owner, rows, cols in _bbox_pixels(outer, grid):
        x, y = _centres(grid, rows, cols)
        band = shapely.contains_xy(outer[owner], x, y) & ~shapely.contains_xy(inner[owner], x, y)
        near[np.unique(owner[band])] = True
    return near


def _bbox_pixels(
    geoms: npt.NDArray[np.object_], grid: GeoBox, max_points: int = 4_000_000
) -> Iterator[tuple[IntArray, IntArray, IntArray]]:
    """(geometry index, row, col) of every pixel whose centre lies in a geometry's bounding box.

    Chunked, so that 100 000 parcels never materialise tens of millions of points at once.
    """
    bounds = shapely.bounds(geoms)
    top, left = grid.fractional_rowcol(bounds[:, 0], bounds[:, 3])
    bottom, right = grid.fractional_rowcol(bounds[:, 2], bounds[:, 1])
    c0 = np.clip(np.floor(left - 0.5), 0, grid.width).astype(np.int64)
    c1 = np.clip(np.ceil(right - 0.5) + 1, 0, grid.width).astype(np.int64)
    r0 = np.clip(np.floor(top - 0.5), 0, grid.height).astype(np.int64)
    r1 = np.clip(np.ceil(bottom - 0.5) + 1, 0, grid.height).astype(np.int64)
    nx, ny = np.maximum(c1 - c0, 0), np.maximum(r1 - r0, 0)
    counts = nx * ny
    start = 0
    while start < len(geoms):
        stop = start + 1
        total = int(counts[start])
        while stop < len(geoms) and total + int(counts[stop]) <= max_points:
            total += int(counts[stop])
            stop += 1
        idx = np.arange(start, stop)
        per = counts[idx]
        owner = np.repeat(idx, per)
        local = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
        yield owner, r0[owner] + local // nx[owner], c0[owner] + local % nx[owner]
        start = stop


def _centres(grid: GeoBox, rows: IntArray, cols: IntArray) -> tuple[FloatArray, FloatArray]:
    return grid.x_centres(cols), grid.y_centres(rows)


def _res_m(grid: GeoBox) -> int:
    """The pixel size in whole metres: a key of ``_World.grids`` and ``labels``, and ``gsd``."""
    return int(grid.resolution.x)


# --- grids --------------------------------------------------------------------------------------


def _crop_grid(aoi_utm: Any) -> GeoBox:
    """The 10 m grid of the cropped product: AOI plus margin, aligned to the tile's 60 m lattice."""
    minx, miny, maxx, maxy = aoi_utm.bounds
    col0 = math.floor((minx - EXTENT_MARGIN_M - TILE_ULX_M) / GRID_ALIGN_M)
    col1 = math.ceil((maxx + EXTENT_MARGIN_M - TILE_ULX_M) / GRID_ALIGN_M)
    row0 = math.floor((TILE_ULY_M - maxy - EXTENT_MARGIN_M) / GRID_ALIGN_M)
    row1 = math.ceil((TILE_ULY_M - miny + EXTENT_MARGIN_M) / GRID_ALIGN_M)
    lattice = TILE_SIZE_M // GRID_ALIGN_M
    if col0 < 0 or row0 < 0 or col1 > lattice or row1 > lattice:
        raise ValueError(f"the world does not fit tile {TILE_ID}; use fewer parcels")
    x0 = TILE_ULX_M + col0 * GRID_ALIGN_M
    y0 = TILE_ULY_M - row0 * GRID_ALIGN_M
    k = GRID_ALIGN_M // 10
    return GeoBox(((row1 - row0) * k, (col1 - col0) * k), Affine(10, 0.0, x0, 0.0, -10, y0), TILE_EPSG)


def _scaled_grid(grid10: GeoBox, res: int) -> GeoBox:
    return grid10.zoomed_out(res // _res_m(grid10))


def _random_box(
    rng: np.random.Generator, extent: tuple[float, float, float, float], fx: float, fy: float
) -> tuple[float, float, float, float]:
    """A box of ``fx`` x ``fy`` of ``extent``'s width and height, placed at random inside it (a
    nodata patch); x is drawn before y, so a seed gives the same worlds as before."""
    xmin, ymin, xmax, ymax = extent
    px, py = rng.uniform(xmin, xmax - fx * (xmax - xmin)), rng.uniform(ymin, ymax - fy * (ymax - ymin))
    return (px, py, px + fx * (xmax - xmin), py + fy * (ymax - ymin))


def _footprint_wgs84(grid: GeoBox) -> Any:
    xmin, ymin, xmax, ymax = grid.bounds
    to_wgs84 = Transformer.from_crs(TILE_EPSG, 4326, always_xy=True)
    corners = [(xmin, ymax), (xmax, ymax), (xmax, ymin), (xmin, ymin), (xmin, ymax)]
    lon, lat = to_wgs84.transform([c[0] for c in corners], [c[1] for c in corners])
    return shapely.Polygon(list(zip(lon, lat, strict=True)))


def _lakes(grid: GeoBox, rng: np.random.Generator) -> FloatArray:
    xmin, ymin, xmax, ymax = grid.bounds
    n = max(1, round((xmax - xmin) * (ymax - ymin) / 25e6))
    return np.column_stack(
        [rng.uniform(xmin, xmax, n), rng.uniform(ymin, ymax, n), rng.uniform(80, 250, n), rng.uniform(60, 180, n)]
    )


# --- products: plan -----------------------------------------------------------------------------


def _plan_products(scenes: int, year: int, grid: GeoBox, rng: np.random.Generator) -> list[_ProductPlan]:
    """Acquisition dates spread over April-September, with a fixed rhythm of clear, cloudy and
    partly-nodata products so that even a 4-scene world exercises every code path."""
    xmin, ymin, xmax, ymax = grid.bounds
    area_km2 = (xmax - xmin) * (ymax - ymin) / 1e6
    start = datetime(year, *SEASON_START, 10, 20, 19, 24000, tzinfo=UTC)
    lon, lat = Transformer.from_crs(TILE_EPSG, 4326, always_xy=True).transform((xmin + xmax) / 2, (ymin + ymax) / 2)
    plans = []
    for i in range(scenes):
        sensing = start + timedelta(days=(i * SEASON_DAYS) // scenes, seconds=int(rng.integers(0, 12)))
        generated = (sensing + timedelta(hours=2, minutes=50 + int(rng.integers(0, 40)))).replace(microsecond=0)
        zenith, azimuth = _sun_angles(sensing, float(lon), float(lat))
        cloudiness = (0.0, rng.uniform(0.05, 0.25), rng.uniform(0.25, 0.6))[i % 3]
        if i % 7 == 5:
            cloudiness = 1.5
        n_blobs = 0 if cloudiness == 0 else max(2, round(cloudiness * area_km2 / 3))
        clouds = np.column_stack(
            [
                rng.uniform(xmin, xmax, n_blobs),
                rng.uniform(ymin, ymax, n_blobs),
                rng.uniform(120.0, 500.0, n_blobs),
                rng.uniform(0.5, 1.4, n_blobs),
            ]
        )
        reach = rng.uniform(1200.0, 2500.0) * math.tan(math.radians(zenith))
        away = math.radians(azimuth + 180.0)
        patch = None
        if i % 5 == 3:
            patch = _random_box(rng, (xmin, ymin, xmax, ymax), 0.1, 0.12)
        plans.append(
            _ProductPlan(
                index=i,
                sensing=sensing,
                generated=generated,
                abs_orbit=max(1, 37491 + round((sensing - datetime(2024, 5, 12, tzinfo=UTC)).days * 14.3)),
                doy=float(sensing.timetuple().tm_yday),
                sun_zenith_deg=zenith,
                sun_azimuth_deg=azimuth,
                clouds=clouds,
                shadow_offset_m=(reach * math.sin(away), reach * math.cos(away)),
                texture_phase=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
                nodata_strip=i % 4 == 1,
                nodata_patch=patch,
            )
        )
    return plans


def _sun_angles(when: datetime, lon: float, lat: float) -> tuple[float, float]:
    """Solar zenith and azimuth (degrees, azimuth clockwise from north); drives shadow direction."""
    doy = when.timetuple().tm_yday
    decl = math.radians(23.44) * math.sin(2 * math.pi * (284 + doy) / 365)
    solar_hours = when.hour + when.minute / 60 + lon / 15
    hour_angle = math.radians(15 * (solar_hours - 12))
    phi = math.radians(lat)
    cos_zen = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(hour_angle)
    zenith = math.degrees(math.acos(cos_zen))
    azimuth = math.degrees(
        math.atan2(math.sin(hour_angle), math.cos(hour_angle) * math.sin(phi) - math.tan(decl) * math.cos(phi))
    )
    return zenith, (azimuth + 180.0) % 360.0


# --- products: pixels ---------------------------------------------------------------------------


@dataclass
class _Fields:
    """The noise-free scene model on one block of rows, shared by all bands of a resolution."""

    label: npt.NDArray[np.int32]
    cover: Float32Array
    soil_weight: Float32Array
    """Bare-soil fraction times the parcel's soil brightness."""
    water: BoolArray
    cloud: Float32Array
    shadow: Float32Array
    transmitted: Float32Array
    """Share of the ground signal that reaches the sensor (cloud shadow darkening, cloud cover)."""
    cloud_weight: Float32Array
    nodata: BoolArray


def _render_product(plan: _ProductPlan, world: _World, img_dir: Path) -> _Truth:
    """Write the product's JP2s and return the truth accumulated from the very arrays written."""
    n_labels = len(world.valid_index) + 1
    cover_by_label, brightness_by_label = _parcel_state(plan, world)
    truth = _Truth(scl=np.zeros(n_labels * 16, dtype=np.int64))
    for res, bands in BANDS_BY_RESOLUTION_M.items():
        grid = world.grids[res]
        arrays = {b: np.empty((grid.height, grid.width), dtype=np.uint8 if b == "SCL" else np.uint16) for b in bands}
        xs = grid.x_centres()
        for r0 in range(0, grid.height, BLOCK_ROWS):
            r1 = min(grid.height, r0 + BLOCK_ROWS)
            f = _fields(plan, world, grid, xs, r0, r1, cover_by_label, brightness_by_label)
            parcel = f.label > 0
            for band_no, band in enumerate(bands):
                rng = np.random.default_rng([world.seed, plan.index, res, r0, band_no])
                if band == "SCL":
                    scl = _scl(f, rng)
                    arrays[band][r0:r1] = scl
                    truth.scl_histogram += np.bincount(scl.ravel(), minlength=16)
                    keep = parcel & (scl != 0)
                    assert truth.scl is not None
                    truth.scl += np.bincount(f.label[keep].astype(np.int64) * 16 + scl[keep], minlength=n_labels * 16)
                    continue
                dn = _dn(band, f, rng)
                arrays[band][r0:r1] = dn
                keep = parcel & (dn != 0)
                lab = f.label[keep]
                truth.counts.setdefault(band, np.zeros(n_labels, dtype=np.int64))
                truth.sums.setdefault(band, np.zeros(n_labels, dtype=np.float64))
                truth.counts[band] += np.bincount(lab, minlength=n_labels)
                truth.sums[band] += np.bincount(
                    lab, weights=dn[keep].astype(np.float64) + BOA_ADD_OFFSET, minlength=n_labels
                )
        folder = img_dir / f"R{res}m"
        folder.mkdir(parents=True, exist_ok=True)
        for band in bands:
            _write_jp2(folder / f"{plan.image_stem(band, res)}.jp2", arrays.pop(band), grid)
    return truth


def _parcel_state(plan: _ProductPlan, world: _World) -> tuple[Float32Array, Float32Array]:
    """Green cover and soil brightness per label value (index 0 = background, unused)."""
    brightness = np.ones(len(world.valid_index) + 1, dtype=np.float64)
    brightness[1:] = world.parcels.soil_brightness[world.valid_index]
    return _parcel_cover(plan.doy, world), brightness.astype(np.float32)


def _parcel_cover(day_of_year: float, world: _World) -> Float32Array:
    """Green cover per label value on a day of the year (index 0 = background, unused)."""
    p = world.parcels
    idx = world.valid_index
    cover = np.zeros(len(idx) + 1, dtype=np.float64)
    for c, crop in enumerate(CROPS):
        mine = p.crop_index[idx] == c
        doy = day_of_year - p.shift_d[idx][mine]
        cover[1:][mine] = crop.cover(doy) * p.vigour[idx][mine]
    return np.clip(cover, 0.02, 0.97).astype(np.float32)


def _fields(
    plan: _ProductPlan,
    world: _World,
    grid: GeoBox,
    xs: FloatArray,
    r0: int,
    r1: int,
    cover_by_label: Float32Array,
    brightness_by_label: Float32Array,
) -> _Fields:
    ys = grid.y_centres(np.arange(r0, r1))
    label = world.labels[_res_m(grid)][r0:r1]
    parcel = label > 0
    p1, p2 = world.background_phase
    seasonal = 0.1 * math.sin(2 * math.pi * (plan.doy - 120) / 365)
    background = 0.5 + 0.3 * np.sin(2 * np.pi * xs / 1900 + p1)[None, :] * np.cos(2 * np.pi * ys / 2700 + p2)[:, None]
    cover = np.where(parcel, cover_by_label[label], np.clip(background + seasonal, 0.05, 0.95)).astype(np.float32)
    water = ~parcel & _ellipses(world.lakes, xs, ys)
    t1, t2 = plan.texture_phase
    texture = (0.8 + 0.2 * np.sin(xs / 173 + t1)[None, :] * np.sin(ys / 211 + t2)[:, None]).astype(np.float32)
    cloud = _blob_field(plan.clouds, xs, ys) * texture
    shifted = plan.clouds.copy()
    shifted[:, 0] += plan.shadow_offset_m[0]
    shifted[:, 1] += plan.shadow_offset_m[1]
    shadow = _blob_field(shifted, xs, ys)
    shade = np.where(cloud < CLOUD_THIN, 1 - 0.6 * np.minimum(shadow, 1), 1).astype(np.float32)
    cloud_weight = np.clip((cloud - 0.1) / 0.8, 0, 0.97).astype(np.float32)
    return _Fields(
        label=label,
        cover=cover,
        soil_weight=brightness_by_label[label] * (1 - cover),
        water=water,
        cloud=cloud,
        shadow=shadow,
        transmitted=shade * (1 - cloud_weight),
        cloud_weight=cloud_weight,
        nodata=_nodata(plan, grid, xs, ys),
    )


def _blob_field(blobs: FloatArray, xs: FloatArray, ys: FloatArray) -> Float32Array:
    """Sum of Gaussian blobs at pixel centres, each evaluated only within 4 sigma (fast at 100k)."""
    out = np.zeros((len(ys), len(xs)), dtype=np.float32)
    if len(blobs) == 0:
        return out
    reach = 4 * blobs[:, 2]
    near = (blobs[:, 1] - reach <= ys[0]) & (blobs[:, 1] + reach >= ys[-1])
    neg_ys = -ys
    for bx, by, sigma, amp in blobs[near]:
        c0, c1 = np.searchsorted(xs, [bx - 4 * sigma, bx + 4 * sigma])
        r0, r1 = np.searchsorted(neg_ys, [-(by + 4 * sigma), -(by - 4 * sigma)])
        if c0 >= c1 or r0 >= r1:
            continue
        dx2 = (xs[c0:c1] - bx) ** 2
        dy2 = (ys[r0:r1] - by) ** 2
        out[r0:r1, c0:c1] += (amp * np.exp(-(dy2[:, None] + dx2[None, :]) / (2 * sigma * sigma))).astype(np.float32)
    return out


def _ellipses(shapes: FloatArray, xs: FloatArray, ys: FloatArray) -> BoolArray:
    """Union of axis-aligned ellipses at pixel centres, each evaluated only inside its box."""
    inside = np.zeros((len(ys), len(xs)), dtype=bool)
    neg_ys = -ys
    for ex, ey, a, b in shapes:
        c0, c1 = np.searchsorted(xs, [ex - a, ex + a])
        r0, r1 = np.searchsorted(neg_ys, [-(ey + b), -(ey - b)])
        if c0 >= c1 or r0 >= r1:
            continue
        dx2 = ((xs[c0:c1] - ex) / a) ** 2
        dy2 = ((ys[r0:r1] - ey) / b) ** 2
        inside[r0:r1, c0:c1] |= dy2[:, None] + dx2[None, :] < 1.0
    return inside


def _nodata(plan: _ProductPlan, grid: GeoBox, xs: FloatArray, ys: FloatArray) -> BoolArray:
    """A swath edge (a slanted strip on the west side) and/or a missing block, in map units so
    that the 10 m and 20 m rasters agree."""
    nodata = np.zeros((len(ys), len(xs)), dtype=bool)
    xmin, ymin, xmax, ymax = grid.bounds
    if plan.nodata_strip:
        width_top, width_bottom = 0.2 * (xmax - xmin), 0.04 * (xmax - xmin)
        edge = xmin + width_bottom + (width_top - width_bottom) * (ys - ymin) / (ymax - ymin)
        nodata |= xs[None, :] < edge[:, None]
    if plan.nodata_patch is not None:
        px0, py0, px1, py1 = plan.nodata_patch
        nodata |= ((xs >= px0) & (xs < px1))[None, :] & ((ys >= py0) & (ys < py1))[:, None]
    return nodata


def _dn(band: str, f: _Fields, rng: np.random.Generator) -> npt.NDArray[np.uint16]:
    soil, veg, water, cloud_refl, noise_sd = (np.float32(v) for v in _SPECTRA[band])
    refl = soil * f.soil_weight
    refl += veg * f.cover
    refl[f.water] = water
    refl *= f.transmitted
    refl += cloud_refl * f.cloud_weight
    refl += rng.standard_normal(refl.shape, dtype=np.float32) * noise_sd
    refl *= np.float32(QUANTIFICATION_VALUE)
    np.rint(refl, out=refl)
    refl -= np.float32(BOA_ADD_OFFSET)
    np.clip(refl, 1, MAX_DN, out=refl)
    dn = refl.astype(np.uint16)
    dn[f.nodata] = 0
    return dn


def _scl(f: _Fields, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    scl = np.where(f.cover >= SCL_VEGETATION_COVER, 4, 5).astype(np.uint8)
    scl[f.water] = 6
    scl[rng.random(scl.shape) < 0.002] = 7
    scl[(f.shadow >= SHADOW_MIN) & (f.cloud < CLOUD_THIN)] = 3
    scl[f.cloud >= CLOUD_THIN] = 10
    scl[f.cloud >= CLOUD_MEDIUM] = 8
    scl[f.cloud >= CLOUD_HIGH] = 9
    scl[f.nodata] = 0
    return scl


def _write_jp2(path: Path, array: npt.NDArray[Any], grid: GeoBox) -> None:
    """Lossless JPEG2000 (reversible 5/3 wavelet), as ESA's are; tiled for windowed reads."""
    with rasterio.open(
        path,
        "w",
        driver="JP2OpenJPEG",
        width=grid.width,
        height=grid.height,
        count=1,
        dtype=array.dtype,
        crs=CRS.from_epsg(TILE_EPSG),
        transform=grid.transform,
        QUALITY=100,
        REVERSIBLE="YES",
        BLOCKXSIZE=1024,
        BLOCKYSIZE=1024,
    ) as dst:
        dst.write(array, 1)


# --- products: metadata -------------------------------------------------------------------------


def _iso(when: datetime, digits: int = 3) -> str:
    frac = f"{when.microsecond:06d}"[:digits]
    return f"{when:%Y-%m-%dT%H:%M:%S}.{frac}Z"


def _write_safe_metadata(safe: Path, plan: _ProductPlan, grid10: GeoBox, footprint: Any, truth: _Truth) -> None:
    granule = safe / "GRANULE" / plan.granule
    (granule / "MTD_TL.xml").write_text(_mtd_tl(plan, grid10))
    (safe / "MTD_MSIL2A.xml").write_text(_mtd_msil2a(plan, footprint, truth))
    (safe / "manifest.safe").write_text(_manifest(safe, plan))


def _qi_percentages(truth: _Truth) -> dict[str, float]:
    hist = truth.scl_histogram
    total = int(hist.sum())
    valid = max(1, total - int(hist[0]))

    def pct(*classes: int) -> float:
        return round(100.0 * sum(int(hist[c]) for c in classes) / valid, 6)

    return {
        "NODATA_PIXEL_PERCENTAGE": round(100.0 * int(hist[0]) / max(1, total), 6),
        "SATURATED_DEFECTIVE_PIXEL_PERCENTAGE": pct(1),
        "DARK_FEATURES_PERCENTAGE": pct(2),
        "CLOUD_SHADOW_PERCENTAGE": pct(3),
        "VEGETATION_PERCENTAGE": pct(4),
        "NOT_VEGETATED_PERCENTAGE": pct(5),
        "WATER_PERCENTAGE": pct(6),
        "UNCLASSIFIED_PERCENTAGE": pct(7),
        "MEDIUM_PROBA_CLOUDS_PERCENTAGE": pct(8),
        "HIGH_PROBA_CLOUDS_PERCENTAGE": pct(9),
        "THIN_CIRRUS_PERCENTAGE": pct(10),
        "SNOW_ICE_PERCENTAGE": pct(11),
    }


def _cloud_cover(truth: _Truth) -> float:
    qi = _qi_percentages(truth)
    return round(
        qi["MEDIUM_PROBA_CLOUDS_PERCENTAGE"] + qi["HIGH_PROBA_CLOUDS_PERCENTAGE"] + qi["THIN_CIRRUS_PERCENTAGE"], 6
    )


def _listed_images(plan: _ProductPlan) -> list[str]:
    return [
        f"GRANULE/{plan.granule}/IMG_DATA/R{res}m/{plan.image_stem(band, res)}"
        for res, bands in BANDS_BY_RESOLUTION_M.items()
        for band in bands
    ]


_NATIVE_RES = {"B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10, "B8A": 20}
_WAVELENGTHS_NM = (
    (411, 456, 442.3), (456, 532, 492.3), (536, 582, 559.0), (646, 685, 665.0), (694, 714, 703.8),
    (730, 748, 739.1), (766, 794, 779.7), (774, 907, 833.0), (848, 880, 864.0), (932, 958, 943.2),
    (1337, 1412, 1376.9), (1539, 1682, 1610.4), (2078, 2320, 2185.7),
)  # fmt: skip


def _mtd_msil2a(plan: _ProductPlan, footprint: Any, truth: _Truth) -> str:
    images = "\n".join(f"            <IMAGE_FILE>{p}</IMAGE_FILE>" for p in _listed_images(plan))
    offsets = "\n".join(
        f'        <BOA_ADD_OFFSET band_id="{i}">{BOA_ADD_OFFSET}</BOA_ADD_OFFSET>' for i in range(len(PSD_BAND_IDS))
    )
    spectral = "\n".join(
        f'        <Spectral_Information bandId="{i}" physicalBand="{b}">\n'
        f"          <RESOLUTION>{_NATIVE_RES.get(b, 60 if b in ('B9', 'B10') else 20)}</RESOLUTION>\n"
        f'          <Wavelength><MIN unit="nm">{lo}</MIN><MAX unit="nm">{hi}</MAX>'
        f'<CENTRAL unit="nm">{mid}</CENTRAL></Wavelength>\n'
        f"        </Spectral_Information>"
        for i, (b, (lo, hi, mid)) in enumerate(zip(PSD_BAND_IDS, _WAVELENGTHS_NM, strict=True))
    )
    ring = " ".join(f"{lat!r} {lon!r}" for lon, lat in footprint.exterior.coords)
    qi = "\n".join(f"      <{k}>{v}</{k}>" for k, v in _qi_percentages(truth).items())
    baseline = PROCESSING_BASELINE
    ds_id = f"{MISSION}_OPER_MSI_L2A_DS_2BPS_{plan.generated:%Y%m%dT%H%M%S}_S{plan.sensing:%Y%m%dT%H%M%S}_N{baseline}"
    tl_id = (
        f"{MISSION}_OPER_MSI_L2A_TL_2BPS_{plan.generated:%Y%m%dT%H%M%S}_A{plan.abs_orbit:06d}_T{TILE_ID}_N{baseline}"
    )
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:schemaLocation="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
  <n1:General_Info>
    <Product_Info>
      <PRODUCT_START_TIME>{_iso(plan.sensing)}</PRODUCT_START_TIME>
      <PRODUCT_STOP_TIME>{_iso(plan.sensing)}</PRODUCT_STOP_TIME>
      <PRODUCT_URI>{plan.name}.SAFE</PRODUCT_URI>
      <PROCESSING_LEVEL>Level-2A</PROCESSING_LEVEL>
      <PRODUCT_TYPE>S2MSI2A</PRODUCT_TYPE>
      <PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>
      <GENERATION_TIME>{_iso(plan.generated, 6)}</GENERATION_TIME>
      <PREVIEW_IMAGE_URL>Not applicable</PREVIEW_IMAGE_URL>
      <PREVIEW_GEO_INFO>Not applicable</PREVIEW_GEO_INFO>
      <Datatake datatakeIdentifier="G{MISSION}_{plan.sensing:%Y%m%dT%H%M%S}_{plan.abs_orbit:06d}_N{baseline}">
        <SPACECRAFT_NAME>Sentinel-2{MISSION[-1]}</SPACECRAFT_NAME>
        <DATATAKE_TYPE>INS-NOBS</DATATAKE_TYPE>
        <DATATAKE_SENSING_START>{_iso(plan.sensing)}</DATATAKE_SENSING_START>
        <SENSING_ORBIT_NUMBER>{RELATIVE_ORBIT}</SENSING_ORBIT_NUMBER>
        <SENSING_ORBIT_DIRECTION>DESCENDING</SENSING_ORBIT_DIRECTION>
      </Datatake>
      <Query_Options completeSingleTile="true">
        <PRODUCT_FORMAT>SAFE_COMPACT</PRODUCT_FORMAT>
      </Query_Options>
      <Product_Organisation>
        <Granule_List>
          <Granule datastripIdentifier="{ds_id}" granuleIdentifier="{tl_id}" imageFormat="JPEG2000">
{images}
          </Granule>
        </Granule_List>
      </Product_Organisation>
    </Product_Info>
    <Product_Image_Characteristics>
      <Special_Values>
        <SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT>
        <SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX>
      </Special_Values>
      <Special_Values>
        <SPECIAL_VALUE_TEXT>SATURATED</SPECIAL_VALUE_TEXT>
        <SPECIAL_VALUE_INDEX>65535</SPECIAL_VALUE_INDEX>
      </Special_Values>
      <Image_Display_Order>
        <RED_CHANNEL>3</RED_CHANNEL>
        <GREEN_CHANNEL>2</GREEN_CHANNEL>
        <BLUE_CHANNEL>1</BLUE_CHANNEL>
      </Image_Display_Order>
      <QUANTIFICATION_VALUES_LIST>
        <BOA_QUANTIFICATION_VALUE unit="none">{QUANTIFICATION_VALUE}</BOA_QUANTIFICATION_VALUE>
        <AOT_QUANTIFICATION_VALUE unit="none">1000.0</AOT_QUANTIFICATION_VALUE>
        <WVP_QUANTIFICATION_VALUE unit="cm">1000.0</WVP_QUANTIFICATION_VALUE>
      </QUANTIFICATION_VALUES_LIST>
      <BOA_ADD_OFFSET_VALUES_LIST>
{offsets}
      </BOA_ADD_OFFSET_VALUES_LIST>
      <Spectral_Information_List>
{spectral}
      </Spectral_Information_List>
    </Product_Image_Characteristics>
  </n1:General_Info>
  <n1:Geometric_Info>
    <Product_Footprint>
      <Product_Footprint>
        <Global_Footprint>
          <EXT_POS_LIST>{ring}</EXT_POS_LIST>
        </Global_Footprint>
      </Product_Footprint>
      <RASTER_CS_TYPE>POINT</RASTER_CS_TYPE>
      <PIXEL_ORIGIN>1</PIXEL_ORIGIN>
    </Product_Footprint>
    <Coordinate_Reference_System>
      <GEO_TABLES version="1">EPSG</GEO_TABLES>
      <HORIZONTAL_CS_TYPE>GEOGRAPHIC</HORIZONTAL_CS_TYPE>
    </Coordinate_Reference_System>
  </n1:Geometric_Info>
  <n1:Quality_Indicators_Info>
    <Cloud_Coverage_Assessment>{_cloud_cover(truth)}</Cloud_Coverage_Assessment>
    <Image_Content_QI>
{qi}
    </Image_Content_QI>
  </n1:Quality_Indicators_Info>
</n1:Level-2A_User_Product>
"""


def _mtd_tl(plan: _ProductPlan, grid10: GeoBox) -> str:
    sizes, positions = [], []
    # The crop starts on the tile's 60 m lattice, so its origin is whole metres, written as ESA does.
    ulx, uly = int(grid10.bounds.left), int(grid10.bounds.top)
    for res in (10, 20, 60):
        factor = res // _res_m(grid10)
        sizes.append(
            f'      <Size resolution="{res}">\n        <NROWS>{grid10.height // factor}</NROWS>\n'
            f"        <NCOLS>{grid10.width // factor}</NCOLS>\n      </Size>"
        )
        positions.append(
            f'      <Geoposition resolution="{res}">\n        <ULX>{ulx}</ULX>\n'
            f"        <ULY>{uly}</ULY>\n        <XDIM>{res}</XDIM>\n        <YDIM>-{res}</YDIM>\n"
            f"      </Geoposition>"
        )
    size_xml, position_xml = "\n".join(sizes), "\n".join(positions)
    baseline = PROCESSING_BASELINE
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<n1:Level-2A_Tile_ID xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-2A_Tile_Metadata.xsd" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:schemaLocation="https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-2A_Tile_Metadata.xsd">
  <n1:General_Info>
    <TILE_ID metadataLevel="Brief">{MISSION}_OPER_MSI_L2A_TL_2BPS_{plan.generated:%Y%m%dT%H%M%S}\
_A{plan.abs_orbit:06d}_T{TILE_ID}_N{baseline}</TILE_ID>
    <DATASTRIP_ID metadataLevel="Standard">{MISSION}_OPER_MSI_L2A_DS_2BPS_{plan.generated:%Y%m%dT%H%M%S}\
_S{plan.sensing:%Y%m%dT%H%M%S}_N{baseline}</DATASTRIP_ID>
    <DOWNLINK_PRIORITY metadataLevel="Standard">NOMINAL</DOWNLINK_PRIORITY>
    <SENSING_TIME metadataLevel="Standard">{_iso(plan.sensing, 6)}</SENSING_TIME>
  </n1:General_Info>
  <n1:Geometric_Info>
    <Tile_Geocoding metadataLevel="Brief">
      <HORIZONTAL_CS_NAME>WGS84 / UTM zone 32N</HORIZONTAL_CS_NAME>
      <HORIZONTAL_CS_CODE>EPSG:{TILE_EPSG}</HORIZONTAL_CS_CODE>
{size_xml}
{position_xml}
    </Tile_Geocoding>
    <Tile_Angles metadataLevel="Standard">
      <Mean_Sun_Angle>
        <ZENITH_ANGLE unit="deg">{plan.sun_zenith_deg:.10f}</ZENITH_ANGLE>
        <AZIMUTH_ANGLE unit="deg">{plan.sun_azimuth_deg:.10f}</AZIMUTH_ANGLE>
      </Mean_Sun_Angle>
    </Tile_Angles>
  </n1:Geometric_Info>
</n1:Level-2A_Tile_ID>
"""


def _manifest(safe: Path, plan: _ProductPlan) -> str:
    """A minimal XFDU manifest listing every file with size and MD5, as ESA's does."""
    files = [safe / "MTD_MSIL2A.xml", safe / "GRANULE" / plan.granule / "MTD_TL.xml"]
    files += [safe / f"{p}.jp2" for p in _listed_images(plan)]
    objects = []
    for path in files:
        data = path.read_bytes()
        rel = path.relative_to(safe).as_posix()
        mime = "application/octet-stream" if path.suffix == ".jp2" else "text/xml"
        object_id = rel.replace("/", "_").replace(".", "_")
        objects.append(
            f'    <dataObject ID="{object_id}">\n'
            f'      <byteStream mimeType="{mime}" size="{len(data)}">\n'
            f'        <fileLocation locatorType="URL" href="./{rel}"/>\n'
            f'        <checksum checksumName="MD5">{hashlib.md5(data).hexdigest().upper()}</checksum>\n'
            f"      </byteStream>\n    </dataObject>"
        )
    data_objects = "\n".join(objects)
    pointers = "\n".join(f'      <dataObjectPointer dataObjectID="{o.split(chr(34))[1]}"/>' for o in objects)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<xfdu:XFDU xmlns:xfdu="urn:ccsds:schema:xfdu:1" xmlns:safe="http://www.esa.int/safe/sentinel/1.1" \
version="esa/safe/sentinel/1.1/sentinel-2/msi/archive_l2a_user_product">
  <informationPackageMap>
    <xfdu:contentUnit unitType="Product_Level-2A" textInfo="SENTINEL-2 MSI Level-2A User Product" \
dmdID="acquisitionPeriod platform">
{pointers}
    </xfdu:contentUnit>
  </informationPackageMap>
  <metadataSection>
    <metadataObject ID="acquisitionPeriod" classification="DESCRIPTION" category="DMD">
      <metadataWrap mimeType="text/xml" vocabularyName="SAFE" textInfo="Acquisition Period">
        <xmlData>
          <safe:acquisitionPeriod>
            <safe:startTime>{_iso(plan.sensing, 6)}</safe:startTime>
          </safe:acquisitionPeriod>
        </xmlData>
      </metadataWrap>
    </metadataObject>
    <metadataObject ID="platform" classification="DESCRIPTION" category="DMD">
      <metadataWrap mimeType="text/xml" vocabularyName="SAFE" textInfo="Platform Description">
        <xmlData>
          <safe:platform>
            <safe:nssdcIdentifier>2017-013A</safe:nssdcIdentifier>
            <safe:familyName>SENTINEL</safe:familyName>
            <safe:number>{MISSION[1:]}</safe:number>
            <safe:instrument>
              <safe:familyName abbreviation="MSI">Multi-Spectral Instrument</safe:familyName>
            </safe:instrument>
          </safe:platform>
        </xmlData>
      </metadataWrap>
    </metadataObject>
  </metadataSection>
  <dataObjectSection>
{data_objects}
  </dataObjectSection>
</xfdu:XFDU>
"""


# --- Sentinel-1 CARD products ------------------------------------------------------------------


def _s1_grid(card: str, world: _World) -> GeoBox:
    """The product's grid: the AOI grid at the card's resolution, less a swath edge (whole pixels,
    so every pixel centre is one the parcels were settled against)."""
    base = world.grids[S1_RESOLUTION_M[card]]
    if card == "bs":
        cut = round(S1_EDGE_FRACTION * base.width)
        return base[:, cut:]
    cut = round(S1_EDGE_FRACTION * base.height)
    return base[: base.height - cut, :]


def _plan_s1(bs: int, c6: int, year: int, world: _World, rng: np.random.Generator) -> list[_S1Plan]:
    """Backscatter dates every few 12-day cycles over the season; coherence pairs in between, the
    first date of each pair 6 days earlier (the other satellite). Every other product has a block
    of no-data."""
    first = datetime(year, *SEASON_START, 5, 25, 41, tzinfo=UTC) + timedelta(days=2)
    orbit_epoch = datetime(2024, 1, 1, tzinfo=UTC)
    plans: list[_S1Plan] = []
    for card, n, shift in (("bs", bs, 0), ("c6", c6, 1)):
        grid = _s1_grid(card, world)
        xmin, ymin, xmax, ymax = grid.bounds
        for i in range(n):
            cycle = min(S1_MAX_SCENES - 1, (i * S1_MAX_SCENES) // n + shift * (S1_MAX_SCENES // (2 * n)))
            start = first + timedelta(days=cycle * S1_REPEAT_DAYS, seconds=int(rng.integers(0, 4)))
            patch = None
            if i % 2 == 1:
                patch = _random_box(rng, (xmin, ymin, xmax, ymax), 0.15, 0.2)
            plans.append(
                _S1Plan(
                    card=card,
                    index=i,
                    start=start,
                    reference=start - timedelta(days=6) if card == "c6" else None,
                    abs_orbit=52000 + round((start - orbit_epoch).days * 175 / S1_REPEAT_DAYS),
                    datatake=int(rng.integers(0x10000, 0xFFFFFF)),
                    unique=int(rng.integers(0, 0xFFFF)),
                    moisture_db=float(rng.uniform(-1.5, 1.5)),
                    grid=grid,
                    nodata_patch=patch,
                )
            )
    return plans


def _s1_levels(plan: _S1Plan, world: _World) -> dict[str, Float32Array]:
    """The noise-free value of every label (index 0: the background) per database band name.

    Backscatter in linear units from a dB model (denser canopy, more volume scattering, VH most),
    coherence falling with canopy (vegetation decorrelates within 6 days)."""
    cover = _parcel_cover(plan.doy, world).astype(np.float64)
    cover[0] = 0.5
    if plan.card == "bs":
        rough = np.ones_like(cover)
        rough[1:] = world.parcels.soil_brightness[world.valid_index]
        vv_db = -16.0 + 7.0 * cover + 4.0 * (rough - 1.0) + plan.moisture_db
        vh_db = -24.0 + 9.0 * cover + 0.5 * plan.moisture_db
        return {
            "VVb": (10.0 ** (vv_db / 10.0)).astype(np.float32),
            "VHb": (10.0 ** (vh_db / 10.0)).astype(np.float32),
        }
    coherence = np.clip(0.75 - 0.55 * cover, 0.05, 0.95)
    return {"VVc": coherence.astype(np.float32), "VHc": (0.85 * coherence).astype(np.float32)}


_S1_WATER = {"VVb": 10 ** (-2.2), "VHb": 10 ** (-2.8), "VVc": 0.05, "VHc": 0.04}


def _render_s1(plan: _S1Plan, world: _World, path: Path) -> _Truth:
    """Write the product's COG and return the truth accumulated from the very values written."""
    grid = plan.grid
    res = _res_m(grid)
    labels = world.labels[res][world.grids[res].window_of(grid)]
    n_labels = len(world.valid_index) + 1
    levels = _s1_levels(plan, world)
    bands = S1_BANDS[plan.card]
    array = np.empty((len(bands), grid.height, grid.width), dtype=np.float32)
    truth = _Truth()
    xs = grid.x_centres()
    card_no = 1 if plan.card == "bs" else 6
    for r0 in range(0, grid.height, BLOCK_ROWS):
        r1 = min(grid.height, r0 + BLOCK_ROWS)
        ys = grid.y_centres(np.arange(r0, r1))
        label = labels[r0:r1]
        parcel = label > 0
        water = ~parcel & _ellipses(world.lakes, xs, ys)
        masked = np.random.default_rng([world.seed, 51, card_no, plan.index, r0, 99]).random(label.shape)
        nodata = masked < S1_MASKED_FRACTION
        if plan.nodata_patch is not None:
            px0, py0, px1, py1 = plan.nodata_patch
            nodata |= ((xs >= px0) & (xs < px1))[None, :] & ((ys >= py0) & (ys < py1))[:, None]
        for band_no, (_, band) in enumerate(bands):
            rng = np.random.default_rng([world.seed, 51, card_no, plan.index, r0, band_no])
            value = levels[band][label]
            value[water] = np.float32(_S1_WATER[band])
            if plan.card == "bs":
                value *= rng.gamma(S1_ENL, 1.0 / S1_ENL, label.shape).astype(np.float32)
            else:
                value += rng.standard_normal(label.shape, dtype=np.float32) * np.float32(S1_COHERENCE_SD)
                np.clip(value, np.float32(0.01), np.float32(0.99), out=value)
            value[nodata] = np.nan
            array[band_no, r0:r1] = value
            keep = parcel & ~nodata
            lab = label[keep]
            truth.counts.setdefault(band, np.zeros(n_labels, dtype=np.int64))
            truth.sums.setdefault(band, np.zeros(n_labels, dtype=np.float64))
            truth.counts[band] += np.bincount(lab, minlength=n_labels)
            truth.sums[band] += np.bincount(lab, weights=value[keep].astype(np.float64), minlength=n_labels)
    _write_card_cog(path, array, plan)
    return truth


def _write_grds(
    n: int, year: int, world: _World, s1_plans: list[_S1Plan], out_dir: Path, truth_path: Path
) -> list[SyntheticGrd]:
    """GRD inputs of CARD-BS on cycles the CARD ``bs`` products leave free (two products of one
    acquisition with different values would contradict each other). γ0 per parcel and date from
    the ``bs`` level model without speckle; lakes are calm water below the noise floor (γ0 = 0)."""
    if n == 0:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([world.seed, 2]))
    first = datetime(year, *SEASON_START, 5, 25, 41, tzinfo=UTC) + timedelta(days=2)
    used = {(p.start - first).days // S1_REPEAT_DAYS for p in s1_plans if p.card == "bs"}
    free = [c for c in range(S1_MAX_SCENES) if c not in used]
    grid, label = world.grids[10], world.labels[10]
    water = (label == 0) & _ellipses(world.lakes, grid.x_centres(), grid.y_centres())
    products: list[SyntheticGrd] = []
    truths: list[tuple[str, dict[str, Float32Array]]] = []
    for i in range(n):
        start = first + timedelta(days=free[(i * len(free)) // n] * S1_REPEAT_DAYS, seconds=int(rng.integers(0, 4)))
        plan = _S1Plan(
            card="bs",
            index=i,
            start=start,
            reference=None,
            abs_orbit=relative_to_absolute_orbit(S1_MISSION, start, S1_RELATIVE_ORBIT),
            datatake=int(rng.integers(0x10000, 0xFFFFFF)),
            unique=int(rng.integers(0, 0xFFFF)),
            moisture_db=float(rng.uniform(-1.5, 1.5)),
            grid=grid,
            nodata_patch=None,
        )
        levels = _s1_levels(plan, world)
        bands = S1_BANDS["bs"]
        truth = BackscatterField(
            grid,
            {pol: np.where(water, np.float32(0), levels[band][label]) for pol, band in bands},
            {pol: float(levels[band][0]) for pol, band in bands},
        )
        acquisition = GrdAcquisition(start, plan.abs_orbit, plan.datatake, plan.unique, mission=S1_MISSION)
        products.append(write_grd(out_dir, acquisition, truth, seed=world.seed))
        truths.append((products[-1].name, levels))
    write_grd_truth(truth_path, truths, label, [world.parcels.ids[i] for i in world.valid_index])
    return products


def _write_card_cog(path: Path, array: Float32Array, plan: _S1Plan) -> None:
    """cbmflow's CARD format: one COG, float32, linear, NaN nodata, bands described VV / VH."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = plan.grid
    with rasterio.open(
        path,
        "w",
        driver="COG",
        width=grid.width,
        height=grid.height,
        count=array.shape[0],
        dtype="float32",
        crs=CRS.from_epsg(TILE_EPSG),
        transform=grid.transform,
        nodata=float("nan"),
        BLOCKSIZE=256,
        COMPRESS="DEFLATE",
        PREDICTOR="YES",
    ) as dst:
        dst.write(array)
        for k, (pol, _) in enumerate(S1_BANDS[plan.card], start=1):
            dst.set_band_description(k, pol)
            dst.update_tags(k, POLARISATION=pol)
        dst.update_tags(
            PRODUCT=plan.name,
            CARD="CARD-BS" if plan.card == "bs" else "CARD-COH6",
            UNITS="linear gamma0" if plan.card == "bs" else "coherence",
            ACQUISITION_START=_iso(plan.start),
            **({"REFERENCE_START": _iso(plan.reference)} if plan.reference is not None else {}),
        )


def _append_s1_truth(truth_path: Path, world: _World, plans: list[_S1Plan], truths: list[_Truth]) -> int:
    """S1 rows appended to ``truth.csv``, in the same form as the S2 rows (database band names)."""
    if not plans:
        return 0
    ids = [world.parcels.ids[i] for i in world.valid_index]
    rows = 0
    with truth_path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        for plan, truth in zip(plans, truths, strict=True):
            names = sorted(band for _, band in S1_BANDS[plan.card])
            counts = {b: truth.counts[b].tolist() for b in names}
            sums = {b: truth.sums[b].tolist() for b in names}
            for k, pid in enumerate(ids, start=1):
                for band in names:
                    n = counts[band][k]
                    if n:
                        writer.writerow([pid, plan.name, band, n, repr(sums[band][k] / n)])
                        rows += 1
    return rows


# --- vector outputs, STAC, truth ----------------------------------------------------------------


def _write_aoi(path: Path, aoi_wgs84: Any, name: str) -> Path:
    feature = {"type": "Feature", "properties": {"name": name}, "geometry": shapely.geometry.mapping(aoi_wgs84)}
    collection = {"type": "FeatureCollection", "features": [feature]}
    path.write_text(json.dumps(collection, indent=1) + "\n")
    return path


def _write_parcels(path: Path, parcels: _Parcels) -> Path:
    """GeoPackage in EPSG:3035; ``OGR_CURRENT_DATE`` pins the ``last_change`` stamp so that the
    same seed gives the same bytes."""
    frame = gpd.GeoDataFrame(
        {
            "parcel_id": parcels.ids,
            "crop_code": np.array([CROPS[i].code for i in parcels.crop_index], dtype=np.int32),
            "crop_name": [CROPS[i].name for i in parcels.crop_index],
        },
        geometry=list(parcels.geoms),
        crs=f"EPSG:{PARCELS_EPSG}",
    )
    if path.exists():
        path.unlink()
    previous = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": "2000-01-01T00:00:00.000Z"})
    try:
        frame.to_file(path, layer="parcels", driver="GPKG", engine="pyogrio", promote_to_multi=False)
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": previous})
    return path


def _write_stac(
    root: Path,
    plans: list[_ProductPlan],
    safes: list[Path],
    truths: list[_Truth],
    footprint: Any,
    aoi_name: str,
    s1: list[tuple[_S1Plan, Path]] | None = None,
    grd: list[SyntheticGrd] | None = None,
) -> Path:
    """A self-contained static catalogue (relative hrefs), so the world can be moved or copied."""
    catalog = pystac.Catalog(
        id=f"cbmflow-testworld-{aoi_name}", description="cbmflow generated test world (synthetic Sentinel-2 L2A)"
    )
    collection = pystac.Collection(
        id="sentinel-2-l2a",
        description="Synthetic Sentinel-2 Level-2A products (SAFE, baseline 05.10) over the test AOI",
        extent=pystac.Extent(
            pystac.SpatialExtent([list(footprint.bounds)]),
            pystac.TemporalExtent([[plans[0].sensing, plans[-1].sensing]]),
        ),
        license="other",
    )
    catalog.add_child(collection)
    for plan, safe, truth in zip(plans, safes, truths, strict=True):
        item = pystac.Item(
            id=plan.name,
            geometry=shapely.geometry.mapping(footprint),
            bbox=list(footprint.bounds),
            datetime=plan.sensing,
            properties={
                "platform": f"sentinel-2{MISSION[-1].lower()}",
                "constellation": "sentinel-2",
                "instruments": ["msi"],
                "eo:cloud_cover": _cloud_cover(truth),
                "s2:mgrs_tile": TILE_ID,
                "s2:product_uri": f"{plan.name}.SAFE",
                "s2:processing_baseline": PROCESSING_BASELINE,
                "grid:code": f"MGRS-{TILE_ID}",
                "mgrs:utm_zone": int(TILE_ID[:2]),
                "mgrs:latitude_band": TILE_ID[2],
                "mgrs:grid_square": TILE_ID[3:],
                "processing:baseline": PROCESSING_BASELINE,
                "processing:level": "L2A",
                "sat:relative_orbit": RELATIVE_ORBIT,
                "sat:absolute_orbit": plan.abs_orbit,
                "proj:code": f"EPSG:{TILE_EPSG}",
                "created": _iso(plan.generated),
                "updated": _iso(plan.generated),
            },
            stac_extensions=[
                "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                "https://stac-extensions.github.io/grid/v1.1.0/schema.json",
                "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
                "https://stac-extensions.github.io/processing/v1.2.0/schema.json",
                "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
                "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
            ],
        )
        item.add_asset(
            "product",
            pystac.Asset(str(safe.resolve()), title="SAFE product", media_type="application/x-safe", roles=["data"]),
        )
        for res, bands in BANDS_BY_RESOLUTION_M.items():
            for band in bands:
                rel = f"GRANULE/{plan.granule}/IMG_DATA/R{res}m/{plan.image_stem(band, res)}.jp2"
                item.add_asset(
                    f"{band}_{res}m",
                    pystac.Asset(
                        str((safe / rel).resolve()),
                        title=f"{band} ({res} m)",
                        media_type="image/jp2",
                        roles=["data"] if band == "SCL" else ["data", "reflectance"],
                        extra_fields={"gsd": res},
                    ),
                )
        collection.add_item(item)
    for card in ("bs", "c6"):
        mine = [(p, f) for p, f in s1 or [] if p.card == card]
        if mine:
            catalog.add_child(_s1_collection(card, mine))
    if grd:
        catalog.add_child(grd_collection(grd))
    catalog.normalize_hrefs(str(root.resolve()))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def _s1_collection(card: str, products: list[tuple[_S1Plan, Path]]) -> pystac.Collection:
    """Items as the watcher reads them: the collection names the card, the ``product`` asset the COG."""
    footprints = [_footprint_wgs84(p.grid) for p, _ in products]
    bounds = shapely.union_all(footprints).bounds
    kind = "CARD-BS" if card == "bs" else "CARD-COH6"
    collection = pystac.Collection(
        id=S1_COLLECTIONS[card],
        description=f"Synthetic Sentinel-1 {kind} products (cbmflow CARD COG: float32, linear, NaN nodata)",
        extent=pystac.Extent(
            pystac.SpatialExtent([list(bounds)]),
            pystac.TemporalExtent([[products[0][0].start, products[-1][0].start]]),
        ),
        license="other",
    )
    for (plan, tif), footprint in zip(products, footprints, strict=True):
        properties: dict[str, Any] = {
            "platform": f"sentinel-1{S1_MISSION[-1].lower()}",
            "constellation": "sentinel-1",
            "instruments": ["c-sar"],
            "sar:instrument_mode": "IW",
            "sar:frequency_band": "C",
            "sar:polarizations": ["VV", "VH"],
            "sar:product_type": kind,
            "sat:orbit_state": "descending",
            "sat:relative_orbit": S1_RELATIVE_ORBIT,
            "sat:absolute_orbit": plan.abs_orbit,
            "proj:code": f"EPSG:{TILE_EPSG}",
            "created": _iso(plan.start + timedelta(hours=5)),
            "updated": _iso(plan.start + timedelta(hours=5)),
        }
        if plan.reference is not None:
            properties["start_datetime"] = _iso(plan.reference)
            properties["end_datetime"] = _iso(plan.start)
        item = pystac.Item(
            id=plan.name,
            geometry=shapely.geometry.mapping(footprint),
            bbox=list(footprint.bounds),
            datetime=plan.start,
            properties=properties,
            stac_extensions=[
                "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
                "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
                "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
                "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            ],
        )
        unit = "linear" if card == "bs" else "coherence"
        item.add_asset(
            "product",
            pystac.Asset(
                str(tif.resolve()),
                title=f"{kind} (VV, VH)",
                media_type=pystac.MediaType.COG,
                roles=["data"],
                extra_fields={
                    "gsd": _res_m(plan.grid),
                    "raster:bands": [
                        {"name": pol, "data_type": "float32", "nodata": "nan", "unit": unit}
                        for pol, _ in S1_BANDS[card]
                    ],
                },
            ),
        )
        collection.add_item(item)
    return collection


def _write_truth(
    truth_path: Path, scl_path: Path, world: _World, plans: list[_ProductPlan], truths: list[_Truth]
) -> int:
    """Rows for every (valid parcel, product, band) with at least one valid pixel; full precision."""
    ids = [world.parcels.ids[i] for i in world.valid_index]
    rows = 0
    with truth_path.open("w", newline="") as fh, scl_path.open("w", newline="") as fh_scl:
        writer, scl_writer = csv.writer(fh), csv.writer(fh_scl)
        writer.writerow(["parcel_id", "product_id", "band", "count", "mean"])
        scl_writer.writerow(["parcel_id", "product_id", "class", "count"])
        for plan, truth in zip(plans, truths, strict=True):
            name = plan.name
            counts = {b: truth.counts[b].tolist() for b in TRUTH_BANDS}
            sums = {b: truth.sums[b].tolist() for b in TRUTH_BANDS}
            assert truth.scl is not None
            scl = truth.scl.reshape(-1, 16).tolist()
            for k, pid in enumerate(ids, start=1):
                for band in TRUTH_BANDS:
                    n = counts[band][k]
                    if n:
                        writer.writerow([pid, name, band, n, repr(sums[band][k] / n)])
                        rows += 1
                for cls, n in enumerate(scl[k]):
                    if cls and n:
                        scl_writer.writerow([pid, name, cls, n])
    return rows


# --- earth-search-shaped COG products (opt-in) --------------------------------------------------

EARTH_SEARCH_FLAVOURS = ("sentinel-2-l2a", "sentinel-2-c1-l2a")
"""``sentinel-2-l2a``: COG DN with the BOA offset already applied (``earthsearch:boa_offset_applied``
true); ``sentinel-2-c1-l2a``: ESA's DN unchanged, offset to apply. Both declare ``offset: -0.1``."""

_ES_ASSET_OF_BAND = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B11": "swir16", "B12": "swir22", "SCL": "scl",
}  # fmt: skip
_COG_MEDIA = "image/tiff; application=geotiff; profile=cloud-optimized"


def write_earth_search_item(safe: Path, out: Path, flavour: str, href_base: str | None = None) -> Path:
    """Write the acquisition of a generated ``.SAFE`` as earth-search publishes it: one COG per band
    and a STAC Item shaped like a real ``flavour`` Item (shapes from a recorded earth-search v1
    response, ``tests/data/earth_search_s2_l2a_item.json``). Returns the Item's path.

    The pixels are the SAFE's, losslessly (JPEG2000 reversible → DEFLATE COG); in the
    ``sentinel-2-l2a`` flavour the offset is applied as Element84 does (DN − 1000), where a valid
    DN would drop to 0 or below it is clipped to 1, since 0 is no-data and uint16 has no negative
    values (such pixels therefore differ from the SAFE; the generated worlds have none in parcels,
    see the tests). ``href_base`` (e.g. ``s3://bucket/prefix`` or ``http://127.0.0.1:port``) replaces
    the local directory in the asset hrefs, for products served from elsewhere.
    """
    from card.s2 import NATIVE_RESOLUTION_M, open_s2_product

    if flavour not in EARTH_SEARCH_FLAVOURS:
        raise ValueError(f"flavour must be one of {EARTH_SEARCH_FLAVOURS}")
    product = open_s2_product(safe)
    applied = flavour == "sentinel-2-l2a"
    day = product.sensing_time
    if applied:
        item_id = f"{product.mission}_{product.tile_id}_{day:%Y%m%d}_0_L2A"
    else:
        item_id = f"{product.mission}_T{product.tile_id}_{day:%Y%m%dT%H%M%S}_L2A"
    folder = Path(out) / flavour / item_id
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{href_base.rstrip('/')}/{flavour}/{item_id}" if href_base else str(folder.resolve())
    assets: dict[str, Any] = {}
    for (band, res), _rel in sorted(product.image_files.items()):
        if NATIVE_RESOLUTION_M.get(band) != res or band not in _ES_ASSET_OF_BAND:
            continue
        jp2 = product.band_path(band)
        with rasterio.open(jp2) as src:
            dn = src.read(1)
            profile = {"crs": src.crs, "transform": src.transform, "width": src.width, "height": src.height}
        if applied and band != "SCL":
            valid = dn != 0
            shifted = dn.astype(np.int32) + product.reflectance_offset(band)
            dn = np.where(valid, np.clip(shifted, 1, MAX_DN), 0).astype(np.uint16)
        name = f"{band}.tif"
        with rasterio.open(
            folder / name, "w", driver="COG", count=1, dtype=dn.dtype, nodata=0, compress="DEFLATE",
            blocksize=512, overviews="NONE", **profile,
        ) as dst:  # fmt: skip
            dst.write(dn, 1)
        t = profile["transform"]
        rb: dict[str, Any] = {"nodata": 0, "data_type": str(dn.dtype), "spatial_resolution": res}
        if band != "SCL":
            rb.update({"bits_per_sample": 15, "scale": 0.0001, "offset": -0.1})
        asset: dict[str, Any] = {
            "href": f"{base}/{name}",
            "type": _COG_MEDIA,
            "title": f"{band} - {res}m",
            "proj:shape": [profile["height"], profile["width"]],
            "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
            "raster:bands": [rb],
            "roles": ["data"] if band == "SCL" else ["data", "reflectance"],
        }
        if band != "SCL":
            asset["gsd"] = res
        assets[_ES_ASSET_OF_BAND[band]] = asset
        if applied:  # sentinel-2-l2a items also list the original JP2s, with the same raster:bands
            assets[f"{_ES_ASSET_OF_BAND[band]}-jp2"] = {**asset, "href": str(jp2.resolve()), "type": "image/jp2"}
    props: dict[str, Any] = {
        "datetime": _iso(day),
        "platform": f"sentinel-2{product.mission[-1].lower()}",
        "constellation": "sentinel-2",
        "instruments": ["msi"],
        "proj:epsg": product.epsg,
        "mgrs:utm_zone": int(product.tile_id[:2]),
        "mgrs:latitude_band": product.tile_id[2],
        "mgrs:grid_square": product.tile_id[3:],
        "grid:code": f"MGRS-{product.tile_id}",
        "s2:product_type": "S2MSI2A",
        "s2:processing_baseline": product.processing_baseline,
        "s2:product_uri": f"{product.product_name}.SAFE",
        "s2:sequence": "0",
    }
    if applied:
        props["earthsearch:boa_offset_applied"] = True
    footprint = product.footprint
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
            "https://stac-extensions.github.io/grid/v1.0.0/schema.json",
        ],
        "id": item_id,
        "collection": flavour,
        "bbox": list(footprint.bounds),
        "geometry": shapely.geometry.mapping(footprint),
        "properties": props,
        "links": [{"rel": "self", "href": f"{base}/{item_id}.json", "type": "application/geo+json"}],
        "assets": assets,
    }
    path = folder / f"{item_id}.json"
    path.write_text(json.dumps(item, indent=2) + "\n")
    return path


RTC_NODATA = -32768.0
"""No-data of Planetary Computer ``sentinel-1-rtc`` COGs (float32)."""


def write_s1_rtc_item(card_cog: Path, out: Path, href_base: str | None = None) -> Path:
    """Write a generated CARD ``bs`` COG as analysis-ready backscatter is published elsewhere: one
    float32 COG per polarisation (linear gamma0, no-data -32768 instead of NaN) and a STAC Item
    shaped like Planetary Computer's ``sentinel-1-rtc`` (assets ``vv``, ``vh``). Returns its path.
    The pixels are the CARD product's, so its truth rows hold for the Item too.
    """
    card_cog = Path(card_cog)
    name = card_cog.stem
    folder = Path(out) / "sentinel-1-rtc" / name
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{href_base.rstrip('/')}/sentinel-1-rtc/{name}" if href_base else str(folder.resolve())
    assets: dict[str, Any] = {}
    with rasterio.open(card_cog) as src:
        profile = {"crs": src.crs, "transform": src.transform, "width": src.width, "height": src.height}
        epsg = src.crs.to_epsg()
        bounds = src.bounds
        for k, desc in enumerate(src.descriptions, start=1):
            pol = str(desc).upper()
            data = src.read(k)
            data = np.where(np.isnan(data), np.float32(RTC_NODATA), data).astype(np.float32)
            file = f"{name}_{pol.lower()}.tif"
            with rasterio.open(
                folder / file, "w", driver="COG", count=1, dtype="float32", nodata=RTC_NODATA,
                compress="DEFLATE", blocksize=512, overviews="NONE", **profile,
            ) as dst:  # fmt: skip
                dst.write(data, 1)
            assets[pol.lower()] = {
                "href": f"{base}/{file}",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "title": f"{pol}: {'vertical' if pol[0] == 'V' else 'horizontal'} transmit, "
                f"{'vertical' if pol[1] == 'V' else 'horizontal'} receive",
                "roles": ["data"],
                "raster:bands": [
                    {"nodata": RTC_NODATA, "data_type": "float32", "spatial_resolution": abs(profile["transform"].a)}
                ],
            }
    footprint = _reproject(shapely.geometry.box(*bounds), Transformer.from_crs(epsg, 4326, always_xy=True))
    parts = name.split("_")
    start = datetime.strptime(parts[4], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.0.0/schema.json",
        ],
        "id": name,
        "collection": "sentinel-1-rtc",
        "bbox": list(footprint.bounds),
        "geometry": shapely.geometry.mapping(footprint),
        "properties": {
            "datetime": _iso(start, 6),
            "platform": f"SENTINEL-1{parts[0][-1]}",
            "constellation": "Sentinel-1",
            "sar:instrument_mode": "IW",
            "sar:polarizations": sorted(p.upper() for p in assets),
            "sar:product_type": "GRD",
            "proj:epsg": epsg,
        },
        "links": [{"rel": "self", "href": f"{base}/{name}.json", "type": "application/geo+json"}],
        "assets": assets,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(item, indent=2) + "\n")
    return path
