"""``cbmflow extract``: the worker's extraction engine without a database, for analysts and checks.

The numbers are the worker's: the same index (GDAL pixel-centre rule), the same kernels, the same
strip-by-strip reading (so memory stays bounded on a full tile), and for Sentinel-2 the same band
resolution rules and ``BOA_ADD_OFFSET``. Only the parcel source (a vector file instead of
PostGIS) and the sink (CSV/Parquet instead of COPY) differ, so an analyst's file can be held
against the database row for row. See docs/extraction.md.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import numpy.typing as npt
import typer

from cbmflow.store import StoreError, gdal_env, gdal_path, in_read_env, is_s3

__all__ = ["extract", "gdal_path", "read_parcels", "register", "resolve_product"]

STAT_COLUMNS = ("count", "mean", "std", "min", "max", "p25", "p50", "p75")
ID_CANDIDATES = ("pid", "parcel_id", "id")
CLASS_BANDS = frozenset({"SCL"})


class ExtractError(Exception):
    """An input the command cannot use: reported as one line, exit status 1."""


@dataclass(frozen=True)
class BandSource:
    """One band to reduce: where GDAL reads it, and how its raw values are interpreted."""

    name: str
    path: str
    bidx: int
    nodata: float | None
    offset: float
    classes: bool


@dataclass(frozen=True)
class Product:
    name: str
    bands: tuple[BandSource, ...]


@dataclass
class Parcels:
    """Parcels of the vector file: id values as read, geometries in ``crs`` (reprojected lazily)."""

    ids: npt.NDArray[Any]
    geoms: Any  # geopandas GeoSeries
    skipped_invalid: int = 0
    _by_crs: dict[str, npt.NDArray[Any]] = field(default_factory=dict)

    def in_crs(self, crs: Any) -> npt.NDArray[Any]:
        key = str(crs)
        if key not in self._by_crs:
            self._by_crs[key] = np.asarray(self.geoms.to_crs(crs).values, dtype=object)
        return self._by_crs[key]


@dataclass
class Result:
    """Rows of the statistics table and of the SCL class table, as column arrays."""

    stats: dict[str, list[Any]]
    classes: dict[str, list[Any]]


def _is_safe(source: str) -> bool:
    stripped = source.rstrip("/")
    if stripped.endswith(".SAFE") or stripped.endswith("MTD_MSIL2A.xml"):
        return True
    p = Path(source)
    return p.is_dir() and (p / "MTD_MSIL2A.xml").is_file()


def _safe_product(source: str, bands: Sequence[str] | None) -> Product:
    from card.s2 import NATIVE_RESOLUTION_M, MissingBandError, normalize_band, open_s2_product
    from cbmflow.store import product_files

    try:
        # local, or s3:// read in place (XML by the S3 API, pixels by /vsis3/)
        product = open_s2_product(product_files(source))
    except (FileNotFoundError, ValueError, StoreError) as exc:
        raise ExtractError(f"{source}: {exc}") from exc
    if bands:
        names = [normalize_band(b) for b in bands]
    else:
        listed = {b for b, res in product.image_files if NATIVE_RESOLUTION_M.get(b) == res}
        names = sorted(b for b in listed if b not in ("AOT", "WVP", "TCI"))
    out = []
    for name in names:
        try:
            path = product.band_path(name)
        except (MissingBandError, ValueError, StoreError) as exc:
            raise ExtractError(f"{product.product_name}: {exc}") from exc
        classes = name in CLASS_BANDS
        out.append(
            BandSource(
                name=name,
                path=str(path),
                bidx=1,
                nodata=float(product.nodata_dn),
                offset=float(product.reflectance_offset(name)),
                classes=classes,
            )
        )
    return Product(product.product_name, tuple(out))


def _raster_product(source: str, bands: Sequence[str] | None, nodata: float | None) -> Product:
    import rasterio
    import rasterio.errors

    path = gdal_path(source)
    try:
        with gdal_env(path), rasterio.open(path) as src:
            descs = [d.strip() if d else "" for d in src.descriptions]
            names = descs if all(descs) and len(set(descs)) == len(descs) else [f"b{i + 1}" for i in range(src.count)]
            nodatas = list(src.nodatavals)
            dtypes = list(src.dtypes)
    except rasterio.errors.RasterioIOError as exc:
        raise ExtractError(f"cannot read raster {source}: {exc}") from exc
    wanted = list(bands) if bands else names
    lookup = {n.upper(): i for i, n in enumerate(names)}
    out = []
    for b in wanted:
        i = lookup.get(b.upper())
        if i is None:
            raise ExtractError(f"{source}: no band {b!r} (bands: {', '.join(names)})")
        nd = nodata if nodata is not None else nodatas[i]
        out.append(
            BandSource(
                name=names[i],
                path=path,
                bidx=i + 1,
                nodata=None if nd is None or (isinstance(nd, float) and math.isnan(nd)) else float(nd),
                offset=0.0,
                classes=names[i].upper() in CLASS_BANDS and dtypes[i] == "uint8",
            )
        )
    stem = Path(urlparse(source).path if "://" in source else source).name
    return Product(stem.rsplit(".", 1)[0] if "." in stem else stem, tuple(out))


def _item_product(source: str, bands: Sequence[str] | None) -> Product:
    """An S2 L2A STAC Item of per-band COGs (earth-search): the same bands, offsets and names as its SAFE."""
    from card.s2 import MissingBandError, normalize_band
    from card.s2cog import open_s2_cog_item
    from worker.items import asset_gdal_path, read_item

    try:
        product = open_s2_cog_item(read_item(source), source)
    except (OSError, ValueError) as exc:
        raise ExtractError(f"{source}: {exc}") from exc
    names = [normalize_band(b) for b in bands] if bands else sorted(product.bands)
    out = []
    for name in names:
        try:
            href = product.band_href(name)
        except MissingBandError as exc:
            raise ExtractError(f"{product.product_name}: {exc}") from exc
        out.append(
            BandSource(
                name=name,
                path=asset_gdal_path(href),
                bidx=1,
                nodata=float(product.nodata(name)),
                offset=float(product.reflectance_offset(name)),
                classes=name in CLASS_BANDS,
            )
        )
    return Product(product.product_name, tuple(out))


def resolve_product(source: str, bands: Sequence[str] | None = None, nodata: float | None = None) -> Product:
    """A SAFE product, an S2 L2A STAC Item of COG assets, or any GDAL raster (GeoTIFF, COG), local
    or s3://, as bands to reduce."""
    from card.s2cog import is_item_location

    if is_item_location(source):
        return _item_product(source, bands)
    if _is_safe(source):
        return _safe_product(source, bands)
    return _raster_product(source, bands, nodata)


def read_parcels(path: str | Path, id_column: str | None = None) -> Parcels:
    """Parcels of any OGR-readable file or GeoParquet; invalid or empty geometries are skipped.

    Invalid polygons (self-intersections) are skipped, as ``cbmflow parcels import`` rejects
    them: GDAL would still burn something for a bow-tie, but no number for it means anything.
    """
    import geopandas as gpd
    import shapely

    p = str(path)
    try:
        gdf = gpd.read_parquet(p) if p.endswith((".parquet", ".geoparquet")) else gpd.read_file(p)
    except Exception as exc:  # noqa: BLE001 - any reader failure is an unusable input
        raise ExtractError(f"cannot read parcels {p}: {exc}") from exc
    if gdf.crs is None:
        raise ExtractError(f"{p}: parcels have no CRS")
    if id_column is None:
        id_column = next((c for c in ID_CANDIDATES if c in gdf.columns), None)
    if id_column is None:
        ids: npt.NDArray[Any] = np.arange(1, len(gdf) + 1, dtype=np.int64)
    elif id_column not in gdf.columns:
        raise ExtractError(f"{p}: no column {id_column!r} (columns: {', '.join(map(str, gdf.columns))})")
    else:
        ids = gdf[id_column].to_numpy()
    geoms = gdf.geometry
    ok = ~(geoms.isna() | geoms.is_empty).to_numpy()
    ok &= shapely.is_valid(np.asarray(geoms.values, dtype=object))
    return Parcels(ids=ids[ok], geoms=geoms[ok].reset_index(drop=True), skipped_invalid=int((~ok).sum()))


@contextmanager
def _gdal_env(paths: Sequence[str]) -> Iterator[None]:
    """The /vsis3/ environment (endpoint, credentials) when any band is on S3; else nothing."""
    with ExitStack() as stack:
        if any(is_s3(p) for p in paths):
            stack.enter_context(gdal_env())
        yield


def extract(
    products: Sequence[Product],
    parcels: Parcels,
    buffer_m: float = 0.0,
    min_pixels: int = 1,
    strip_rows: int | None = None,
) -> Result:
    """Statistics of every band of every product; one parcel index per distinct grid, reused.

    Engine ``pid`` s are parcel positions, mapped back to the file's id values on output, so ids
    may be strings. Rows are ordered by product, band, then parcel position in the file.
    """
    import rasterio

    from card.geobox import GeoBox
    from worker import engine

    strip = strip_rows or engine.DEFAULT_STRIP_ROWS
    positions = np.arange(len(parcels.ids), dtype=np.int64)
    indexes: dict[GeoBox, engine.StripPlan] = {}
    stats: dict[str, list[Any]] = {k: [] for k in ("pid", "product", "band", *STAT_COLUMNS)}
    classes: dict[str, list[Any]] = {k: [] for k in ("pid", "product", "class", "count")}
    with _gdal_env([b.path for p in products for b in p.bands]):
        for product in products:
            for band in product.bands:
                with rasterio.open(band.path) as src:
                    grid = GeoBox.from_dataset(src)
                    plan = indexes.get(grid)
                    if plan is None:
                        index = engine.build_index(parcels.in_crs(src.crs), positions, grid, buffer_m=buffer_m)
                        plan = indexes[grid] = engine.plan_strips(index, strip)
                    read = in_read_env(band.path, engine.window_reader(src, plan.index, band.bidx))
                    if band.classes:
                        nd = None if band.nodata is None else int(band.nodata)
                        hist = engine.class_histograms_strips(plan, read, nodata=nd)
                        n = len(hist.pid)
                        classes["pid"].extend(parcels.ids[hist.pid].tolist())
                        classes["product"].extend([product.name] * n)
                        classes["class"].extend(hist.cls.tolist())
                        classes["count"].extend(hist.count.tolist())
                        continue
                    s = engine.band_stats_strips(plan, read, nodata=band.nodata, offset=band.offset)
                keep = s.count >= min_pixels
                n = int(keep.sum())
                stats["pid"].extend(parcels.ids[s.pid[keep]].tolist())
                stats["product"].extend([product.name] * n)
                stats["band"].extend([band.name] * n)
                for col in STAT_COLUMNS:
                    stats[col].extend(getattr(s, col)[keep].tolist())
    return Result(stats, classes)


def scl_path_for(out: Path) -> Path:
    """``stats.csv`` → ``stats_scl.csv``: the class histograms go next to the statistics."""
    return out.with_name(f"{out.stem}_scl{out.suffix}")


def write_table(columns: dict[str, list[Any]], out: Path, with_product: bool) -> None:
    """CSV (shortest round-trip float text) or Parquet, chosen by the suffix."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cols = {k: v for k, v in columns.items() if with_product or k != "product"}
    types = {"count": pa.int64(), "class": pa.int16(), "band": pa.string(), "product": pa.string()}
    arrays = {}
    for k, v in cols.items():
        typ = types.get(k, pa.float64() if k in STAT_COLUMNS else None)
        arrays[k] = pa.array(v, type=typ)
    table = pa.table(arrays)
    if out.suffix.lower() == ".parquet":
        pq.write_table(table, out)
    elif out.suffix.lower() == ".csv":
        pacsv.write_csv(table, out)
    else:
        raise ExtractError(f"{out}: output must end in .csv or .parquet")


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract_cmd(
        sources: list[str] = typer.Argument(
            ...,
            help="S2 L2A .SAFE dirs, S2 L2A STAC Items of COGs (.json, http(s)://), GeoTIFF/COG rasters; s3:// too.",
        ),
        parcels: Path = typer.Option(..., "--parcels", help="Parcels: any OGR vector file or GeoParquet."),
        out: Path = typer.Option(..., "--out", help="stats.csv or stats.parquet; SCL goes to <out>_scl.<ext>."),
        id_column: str | None = typer.Option(None, "--id-column", help="Parcel id column (default: pid|parcel_id|id)."),
        bands: str | None = typer.Option(None, "--bands", help="Bands, e.g. B04,B08,SCL (default: all)."),
        buffer_m: float = typer.Option(0.0, "--buffer-m", help="Buffer in metres; negative shrinks."),
        min_pixels: int = typer.Option(1, "--min-pixels", help="Drop rows with fewer valid pixels."),
        nodata: float | None = typer.Option(None, "--nodata", help="Nodata of GeoTIFF inputs (default: the file's)."),
    ) -> None:
        """Per-parcel statistics (count mean std min max p25 p50 p75) without a database."""
        if out.suffix.lower() not in (".csv", ".parquet"):
            typer.echo(f"error: {out}: output must end in .csv or .parquet", err=True)
            raise typer.Exit(1)
        band_list = [b.strip() for b in bands.split(",") if b.strip()] if bands else None
        try:
            products = [resolve_product(s, band_list, nodata) for s in sources]
            parcel_set = read_parcels(parcels, id_column)
            if parcel_set.skipped_invalid:
                typer.echo(
                    f"warning: {parcel_set.skipped_invalid} invalid or empty parcel geometries skipped", err=True
                )
            result = extract(products, parcel_set, buffer_m=buffer_m, min_pixels=min_pixels)
            several = len(products) > 1
            out.parent.mkdir(parents=True, exist_ok=True)
            write_table(result.stats, out, several)
            if result.classes["pid"]:
                write_table(result.classes, scl_path_for(out), several)
        except (ExtractError, FileNotFoundError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        n = len(result.stats["pid"])
        print(f"{n} rows, {len(products)} product(s) -> {out}", file=sys.stderr)
