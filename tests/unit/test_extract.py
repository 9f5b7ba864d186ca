"""``cbmflow extract`` against references that are not the engine: the test world's truth (its own
point-in-polygon labels and the DN it wrote) and rasterstats on GeoTIFFs read back from disk."""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import rasterio
import typer
from rasterstats import zonal_stats
from test_engine import CRS, HEIGHT, STATS, TRANSFORM, WIDTH, mixed_parcels, random_polygons, uint16_band
from typer.testing import CliRunner

from card.testworld import generate
from worker import extract


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, parcels=60, scenes=3, seed=5, aoi_name="ms", year=2024)
    return out


def run(cli: typer.Typer, *args: str) -> Any:
    return CliRunner().invoke(cli, ["extract", *args])


def safes(world: Path) -> list[str]:
    return sorted(str(p) for p in (world / "products").glob("*.SAFE"))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_safe_products_reproduce_the_truth(world: Path, cli: typer.Typer, tmp_path: Path) -> None:
    out = tmp_path / "stats.csv"
    res = run(
        cli, *safes(world), "--parcels", str(world / "parcels.gpkg"), "--id-column", "parcel_id", "--out", str(out)
    )
    assert res.exit_code == 0, res.output
    truth = {(r["parcel_id"], r["product_id"], r["band"]): r for r in read_csv(world / "truth.csv")}
    ours = {(r["pid"], r["product"], r["band"]): r for r in read_csv(out)}
    # The truth holds the six reflectance bands; every one of ours is there and nothing is missing.
    assert set(ours) == set(truth)
    for key, t in truth.items():
        o = ours[key]
        assert int(o["count"]) == int(t["count"]), key
        assert float(o["mean"]) == pytest.approx(float(t["mean"]), rel=1e-9, abs=1e-12), key
        assert float(o["min"]) <= float(o["p25"]) <= float(o["p50"]) <= float(o["p75"]) <= float(o["max"])
    scl_truth = {
        (r["parcel_id"], r["product_id"], r["class"]): int(r["count"]) for r in read_csv(world / "truth_scl.csv")
    }
    scl = {(r["pid"], r["product"], r["class"]): int(r["count"]) for r in read_csv(extract.scl_path_for(out))}
    assert scl == scl_truth


def test_csv_and_parquet_round_trip(world: Path, tmp_path: Path) -> None:
    products = [extract.resolve_product(s, ["B04", "B11", "SCL"]) for s in safes(world)[:2]]
    parcels = extract.read_parcels(world / "parcels.gpkg", "parcel_id")
    # Tiny strips: parcels span many strip edges, and must still get the whole-raster numbers.
    result = extract.extract(products, parcels, strip_rows=7)
    whole = extract.extract(products, parcels, strip_rows=100_000)
    assert result.stats == whole.stats and result.classes == whole.classes
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"s{suffix}"
        extract.write_table(result.stats, out, with_product=True)
        extract.write_table(result.classes, extract.scl_path_for(out), with_product=True)
        read = pq.read_table if suffix == ".parquet" else pacsv.read_csv
        back = read(out).to_pydict()
        assert list(back) == ["pid", "product", "band", *extract.STAT_COLUMNS]
        for col, values in result.stats.items():
            assert back[col] == values, col  # floats too: CSV text must round-trip exactly
        assert read(extract.scl_path_for(out)).to_pydict() == result.classes


def test_missing_band_file_is_an_error(world: Path, cli: typer.Typer, tmp_path: Path) -> None:
    safe = tmp_path / Path(safes(world)[0]).name
    shutil.copytree(safes(world)[0], safe)
    (b04,) = safe.glob("GRANULE/*/IMG_DATA/R10m/*_B04_10m.jp2")
    b04.unlink()
    out = tmp_path / "stats.parquet"
    res = run(cli, str(safe), "--parcels", str(world / "parcels.gpkg"), "--out", str(out))
    assert res.exit_code == 1
    assert "band B04" in res.output and "missing" in res.output
    assert not out.exists()
    res = run(cli, safes(world)[0], "--parcels", str(world / "parcels.gpkg"), "--bands", "B07", "--out", str(out))
    assert res.exit_code == 1 and "band B07" in res.output


def write_bands(path: Path, bands: dict[str, np.ndarray[Any, Any]], nodata: float | None) -> Path:
    first = next(iter(bands.values()))
    with rasterio.open(
        path, "w", driver="GTiff", height=HEIGHT, width=WIDTH, count=len(bands), dtype=first.dtype, crs=CRS,
        transform=TRANSFORM, nodata=nodata, tiled=True, blockxsize=16, blockysize=16, compress="deflate",
    ) as dst:  # fmt: skip
        for i, (name, data) in enumerate(bands.items(), start=1):
            dst.write(data, i)
            dst.set_band_description(i, name)
    return path


def reference(geoms: list[Any], path: Path, band: int, nodata: float | None) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(zonal_stats(geoms, str(path), band=band, all_touched=False, nodata=nodata, stats=STATS))


def assert_rows_match(rows: list[dict[str, str]], band: str, pids: list[int], ref: list[dict[str, Any]], rtol: float):
    got = {int(r["pid"]): r for r in rows if r["band"] == band}
    want = {p: r for p, r in zip(pids, ref, strict=True) if r["count"]}
    assert set(got) == set(want), band
    for pid, r in want.items():
        g = got[pid]
        assert int(g["count"]) == r["count"]
        for ours, theirs in (("mean", "mean"), ("std", "std"), ("min", "min"), ("max", "max"),
                             ("p25", "percentile_25"), ("p50", "percentile_50"), ("p75", "percentile_75")):  # fmt: skip
            assert float(g[ours]) == pytest.approx(r[theirs], rel=rtol, abs=1e-9), (band, pid, ours)


def test_geotiffs_float_nan_and_integer_match_rasterstats(cli: typer.Typer, tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    # Invalid geometries are skipped by the command (as by the parcel import); the rest is compared.
    geoms = [g for g in mixed_parcels() + random_polygons(rng, 80) if g.is_valid]
    pids = list(range(100, 100 + len(geoms)))
    parcels = tmp_path / "parcels.parquet"
    gpd.GeoDataFrame({"pid": pids}, geometry=geoms, crs=CRS).to_parquet(parcels)
    vv = rng.gamma(2.0, 0.05, (HEIGHT, WIDTH)).astype(np.float32)  # linear backscatter
    vh = (vv * rng.uniform(0.1, 0.3, vv.shape)).astype(np.float32)
    vv[30:45, 15:60] = np.nan  # swath edge / layover: NaN is the S1 CARD nodata
    vh[60:120, 100:110] = np.nan
    # NaN as the file nodata too: rasterstats fills outside the raster with it (None would fill 0s).
    s1 = write_bands(tmp_path / "s1_card_bs.tif", {"VV": vv, "VH": vh}, nodata=float("nan"))
    b04 = write_bands(tmp_path / "b04.tif", {"B04": uint16_band(rng)}, nodata=0)
    out = tmp_path / "stats.csv"
    res = run(cli, str(s1), str(b04), "--parcels", str(parcels), "--out", str(out))
    assert res.exit_code == 0, res.output
    rows = read_csv(out)
    assert {r["product"] for r in rows} == {"s1_card_bs", "b04"}
    # rasterstats accumulates float32 in float32, we in float64: agreement to ~1e-7 relative.
    assert_rows_match(
        [r for r in rows if r["product"] == "s1_card_bs"], "VV", pids, reference(geoms, s1, 1, None), 1e-6
    )
    assert_rows_match(
        [r for r in rows if r["product"] == "s1_card_bs"], "VH", pids, reference(geoms, s1, 2, None), 1e-6
    )
    assert_rows_match([r for r in rows if r["product"] == "b04"], "B04", pids, reference(geoms, b04, 1, 0), 1e-12)

    # --min-pixels and --buffer-m: the reference is rasterstats on the buffered geometries.
    out2 = tmp_path / "buffered.csv"
    res = run(cli, str(b04), "--parcels", str(parcels), "--buffer-m", "-5", "--min-pixels", "20", "--out", str(out2))
    assert res.exit_code == 0, res.output
    buffered = [g.buffer(-5) for g in geoms]
    keep = [i for i, g in enumerate(buffered) if not g.is_empty]
    ref = reference([buffered[i] for i in keep], b04, 1, 0)
    ref = [r if (r["count"] or 0) >= 20 else {**r, "count": 0} for r in ref]
    assert_rows_match(read_csv(out2), "B04", [pids[i] for i in keep], ref, 1e-12)
    assert "product" not in read_csv(out2)[0]


def test_gdal_paths() -> None:
    assert extract.gdal_path("s3://bucket/a/b.tif") == "/vsis3/bucket/a/b.tif"
    assert extract.gdal_path("/data/b.tif") == "/data/b.tif"
    assert extract.gdal_path("file:///data/b.tif") == "/data/b.tif"
