"""The test-world generator: determinism, realistic vector data, SAFE/STAC output, and a truth that
an independent rasteriser (rasterstats / GDAL, pixel-centre rule) reproduces."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import statistics
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pystac
import pytest
import rasterio
import shapely
import shapely.geometry
from affine import Affine
from rasterstats import zonal_stats

from card.geobox import GeoBox
from card.s2 import open_s2_product
from card.testworld import CROPS, WorldSummary, _write_jp2, generate

# rasterstats still multiplies affine matrices with "*".
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    # 4 scenes: clear; light cloud + swath-edge nodata; cloudy; clear + nodata block.
    return generate(tmp_path_factory.mktemp("world"), parcels=120, scenes=4, seed=3)


@pytest.fixture(scope="module")
def parcels(world: WorldSummary) -> gpd.GeoDataFrame:
    return gpd.read_file(world.parcels_path, layer="parcels", engine="pyogrio")


def _truth(path: Path) -> dict[tuple[str, str, str], tuple[int, float]]:
    with path.open() as fh:
        return {
            (r["parcel_id"], r["product_id"], r["band"]): (int(r["count"]), float(r["mean"]))
            for r in csv.DictReader(fh)
        }


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", parcels=30, scenes=2, seed=5)
    b = generate(tmp_path / "b", parcels=30, scenes=2, seed=5)
    c = generate(tmp_path / "c", parcels=30, scenes=2, seed=6)
    ha, hb, hc = _hashes(a.out), _hashes(b.out), _hashes(c.out)
    assert len(ha) > 20 and ha == hb
    assert a.products == b.products
    for name in ("parcels.gpkg", "truth.csv", "truth_scl.csv"):
        assert ha[name] != hc[name]
    # Regenerating in place replaces the products and the catalogue instead of accumulating.
    again = generate(tmp_path / "a", parcels=30, scenes=1, seed=5)
    assert len(list((tmp_path / "a" / "products").iterdir())) == 1 == len(again.products)


def test_summary_and_layout(world: WorldSummary) -> None:
    assert (world.n_parcels, len(world.products), world.tile_id) == (120, 4, "32UPU")
    assert (world.parcels_epsg, world.raster_epsg) == (3035, 32632)
    for path in (world.aoi_path, world.parcels_path, world.invalid_parcels_path, world.truth_path):
        assert path.is_file()
    assert world.stac_catalog_path == world.out / "stac" / "catalog.json"
    for name, safe in zip(world.products, world.product_paths, strict=True):
        assert safe == world.out / "products" / f"{name}.SAFE"
        assert name.startswith("S2B_MSIL2A_2024") and "_N0510_R065_T32UPU_" in name
        granule = next((safe / "GRANULE").iterdir())
        assert granule.name.startswith("L2A_T32UPU_A")
        assert {p.name for p in (granule / "IMG_DATA").iterdir()} == {"R10m", "R20m"}
    dates = [n.split("_")[2] for n in world.products]
    assert dates == sorted(dates) and dates[0][4:8] >= "0401" and dates[-1][4:8] <= "0930"
    aoi = json.loads(world.aoi_path.read_text())
    assert len(aoi["features"]) == 1 and aoi["features"][0]["properties"] == {"name": "ms"}
    shape = shapely.geometry.shape(aoi["features"][0]["geometry"])
    assert shape.is_valid and shape.bounds == pytest.approx(world.aoi_bbox)


def test_parcels_are_field_like(world: WorldSummary, parcels: gpd.GeoDataFrame) -> None:
    assert pyogrio.list_layers(world.parcels_path)[:, 0].tolist() == ["parcels"]
    assert parcels.crs.to_epsg() == 3035
    assert list(parcels.columns) == ["parcel_id", "crop_code", "crop_name", "geometry"]
    assert parcels.parcel_id.iloc[0] == "P-000001" and parcels.parcel_id.is_unique
    assert set(parcels.crop_code) <= {c.code for c in CROPS} and parcels.crop_name.nunique() >= 5

    invalid_ids = world.invalid_parcels_path.read_text().split()
    assert len(invalid_ids) == world.n_invalid >= 2
    is_invalid = parcels.parcel_id.isin(invalid_ids)
    assert not shapely.is_valid(parcels.geometry[is_invalid]).any()
    assert "Self-intersection" in shapely.is_valid_reason(parcels.geometry[is_invalid].iloc[0])
    good = parcels[~is_invalid]
    assert shapely.is_valid(good.geometry).all()
    assert (good.geom_type == "MultiPolygon").sum() >= 2
    assert (shapely.get_num_geometries(good.geometry[good.geom_type == "MultiPolygon"]) == 2).all()
    assert (shapely.get_num_interior_rings(good.geometry[good.geom_type == "Polygon"]) > 0).sum() >= 2
    assert (good.area.between(5_000, 50_000)).all()
    tree = shapely.STRtree(good.geometry.values)
    pairs = tree.query(good.geometry.values, predicate="intersects")
    assert (pairs[0] == pairs[1]).all(), "parcels must not overlap"


def test_pixel_centre_rule_is_unambiguous(world: WorldSummary, parcels: gpd.GeoDataFrame) -> None:
    """Vertices are random floats (not on the 5 m lattice of pixel edges and centres), and no pixel
    centre lies within 1 cm of a boundary, so PROJ-version noise cannot flip a pixel."""
    good = parcels[shapely.is_valid(parcels.geometry)].to_crs(32632)
    xy = shapely.get_coordinates(good.geometry.values)
    phase = np.mod(xy - [652200.0, 5347700.0], 5.0) / 5.0
    assert (np.histogram(phase, bins=10, range=(0, 1))[0] > 0.05 * phase.size).all()
    product = open_s2_product(world.product_paths[0])
    for res in (10, 20):
        grid = product.tile_grid(res)
        for geom in good.geometry:
            minx, miny, maxx, maxy = geom.bounds
            ulx, uly = grid.bounds.left, grid.bounds.top
            cols = np.arange(np.floor((minx - ulx) / res), np.ceil((maxx - ulx) / res))
            rows = np.arange(np.floor((uly - maxy) / res), np.ceil((uly - miny) / res))
            x, y = np.meshgrid(ulx + (cols + 0.5) * res, uly - (rows + 0.5) * res)
            distance = shapely.distance(geom.boundary, shapely.points(x.ravel(), y.ravel()))
            assert distance.min() >= 0.01


def test_jp2_roundtrip_is_lossless(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grid = GeoBox((257, 301), Affine(10, 0.0, 652200.0, 0.0, -10, 5347700.0), 32632)
    reflectance = rng.integers(0, 65536, (257, 301), dtype=np.uint16)
    scl = rng.integers(0, 12, (257, 301), dtype=np.uint8)
    for name, array in (("b.jp2", reflectance), ("scl.jp2", scl)):
        _write_jp2(tmp_path / name, array, grid)
        with rasterio.open(tmp_path / name) as src:
            assert src.driver == "JP2OpenJPEG" and src.dtypes[0] == array.dtype.name
            assert np.array_equal(src.read(1), array)
            assert tuple(src.transform)[:6] == (10.0, 0.0, 652200.0, 0.0, -10.0, 5347700.0)


def test_truth_matches_independent_rasterisation(world: WorldSummary, parcels: gpd.GeoDataFrame) -> None:
    """rasterstats (GDAL rasterize, all_touched=False) on the written JP2 reproduces truth.csv."""
    truth = _truth(world.truth_path)
    invalid = set(world.invalid_parcels_path.read_text().split())
    assert not {k[0] for k in truth} & invalid
    good = parcels[~parcels.parcel_id.isin(invalid)].to_crs(32632)
    checked = 0
    for index in (1, 2):  # the swath-edge product and the cloudy one
        product = open_s2_product(world.product_paths[index])
        for band in ("B04", "B08", "B05", "B11"):
            with rasterio.open(product.band_path(band)) as src:  # decode once, not once per parcel
                values, affine = src.read(1), src.transform
            stats = zonal_stats(
                list(good.geometry), values, affine=affine, stats="count sum", all_touched=False, nodata=0
            )
            for pid, s in zip(good.parcel_id, stats, strict=True):
                want = truth.get((pid, product.product_name, band))
                if s["count"] == 0:
                    assert want is None, (pid, band)
                    continue
                assert want is not None, (pid, band)
                mean = s["sum"] / s["count"] + product.reflectance_offset(band)
                assert want[0] == s["count"], (pid, band)
                assert want[1] == pytest.approx(mean, rel=1e-9, abs=1e-9), (pid, band)
                checked += 1
    assert checked > 700


def test_nodata_is_excluded_and_partial_parcels_exist(world: WorldSummary) -> None:
    truth = _truth(world.truth_path)
    clear, strip = world.products[0], world.products[1]
    ids = {k[0] for k in truth}
    missing = [p for p in ids if (p, clear, "B04") in truth and (p, strip, "B04") not in truth]
    partial = [p for p in ids if (p, strip, "B04") in truth and truth[p, strip, "B04"][0] < truth[p, clear, "B04"][0]]
    assert missing and partial, "the swath edge must swallow some parcels and cut others"
    with rasterio.open(open_s2_product(world.product_paths[1]).band_path("B11")) as src:
        dn = src.read(1)
    # Nodata is DN 0; valid DN below 1000 are genuine (noisy) negative reflectances over water.
    assert (dn == 0).any() and dn[dn > 0].min() >= 1 and (dn[dn > 0] < 1000).any()


def test_scl_truth_and_clouds(world: WorldSummary, parcels: gpd.GeoDataFrame) -> None:
    invalid = set(world.invalid_parcels_path.read_text().split())
    good = parcels[~parcels.parcel_id.isin(invalid)].to_crs(32632)
    cloudy = open_s2_product(world.product_paths[2])
    with world.truth_scl_path.open() as fh:
        want: dict[str, dict[int, int]] = defaultdict(dict)
        classes = set()
        for r in csv.DictReader(fh):
            classes.add(int(r["class"]))
            if r["product_id"] == cloudy.product_name:
                want[r["parcel_id"]][int(r["class"])] = int(r["count"])
    assert {3, 4, 5, 8, 9, 10} <= classes and 0 not in classes
    with rasterio.open(cloudy.band_path("SCL")) as src:
        scl_values, affine = src.read(1), src.transform
    got = zonal_stats(list(good.geometry), scl_values, affine=affine, categorical=True, nodata=0)
    assert {pid: dict(g) for pid, g in zip(good.parcel_id, got, strict=True) if g} == dict(want)

    items = {i.id: i for i in pystac.Catalog.from_file(world.stac_catalog_path).get_items(recursive=True)}
    covers = [items[n].properties["eo:cloud_cover"] for n in world.products]
    assert covers[0] == 0 and covers[2] > 1
    # Cloudy pixels stay valid data: bright, but not nodata.
    with rasterio.open(cloudy.band_path("B02")) as b02, rasterio.open(cloudy.band_path("SCL")) as scl:
        blue = b02.read(1)[::2, ::2][: scl.height, : scl.width]
        classes_20m = scl.read(1)
    assert np.median(blue[classes_20m == 9]) > 1000 + 3000 > np.median(blue[classes_20m == 4])


def test_crops_have_distinct_phenology(world: WorldSummary, parcels: gpd.GeoDataFrame) -> None:
    """Median NDVI per crop from truth.csv: wheat green in May and harvested by August, maize the
    opposite. The chain test relies on signatures like these being recoverable."""
    truth = _truth(world.truth_path)
    crop_of = dict(zip(parcels.parcel_id, parcels.crop_name, strict=True))
    may, august = world.products[1], world.products[3]

    def median_ndvi(crop: str, product: str) -> float:
        values = []
        for pid, name in crop_of.items():
            red, nir = truth.get((pid, product, "B04")), truth.get((pid, product, "B08"))
            if name == crop and red and nir:
                values.append((nir[1] - red[1]) / (nir[1] + red[1]))
        return statistics.median(values)

    assert median_ndvi("winter wheat", may) > 0.6 > median_ndvi("maize", may)
    assert median_ndvi("maize", august) > 0.6 > median_ndvi("winter wheat", august)


def test_stac_catalogue_is_self_contained(world: WorldSummary, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(world.out, moved)
    catalog = pystac.read_file(moved / "stac" / "catalog.json")
    assert isinstance(catalog, pystac.Catalog)
    collection = catalog.get_child("sentinel-2-l2a")
    assert collection is not None
    items = sorted(catalog.get_items(recursive=True), key=lambda i: i.id)
    assert [i.id for i in items] == sorted(world.products)
    aoi = shapely.geometry.shape(json.loads(world.aoi_path.read_text())["features"][0]["geometry"])
    for item in items:
        assert item.collection_id == "sentinel-2-l2a"
        product_href = item.assets["product"].get_absolute_href()
        assert product_href is not None
        safe = Path(product_href)
        assert safe.is_dir() and safe.name == f"{item.id}.SAFE" and moved in safe.parents
        product = open_s2_product(safe)
        assert item.datetime == product.sensing_time
        assert shapely.geometry.shape(item.geometry).equals(product.footprint)
        assert shapely.geometry.shape(item.geometry).contains(aoi)
        props = item.properties
        assert props["s2:mgrs_tile"] == "32UPU" and props["grid:code"] == "MGRS-32UPU"
        assert props["processing:baseline"] == "05.10" and props["updated"]
        assert 0 <= props["eo:cloud_cover"] <= 100
        for key in ("B02_10m", "B03_10m", "B04_10m", "B08_10m", "B05_20m", "B11_20m", "SCL_20m"):
            href = item.assets[key].get_absolute_href()
            assert href is not None and Path(href) == product.band_path(key.split("_")[0])
    raw = (moved / "stac").rglob("*.json")
    assert not any(str(world.out) in p.read_text() for p in raw), "hrefs must be relative"


def test_pystac_client_opens_the_static_catalogue(world: WorldSummary) -> None:
    from pystac_client import Client

    with pytest.warns(Warning):  # a static catalogue has no search conformance
        client = Client.open(str(world.stac_catalog_path))
        ids = {i.id for i in client.get_items(recursive=True)}
    assert ids == set(world.products)


def test_manifest_lists_every_file_with_its_md5(world: WorldSummary) -> None:
    safe = world.product_paths[0]
    root = ET.parse(safe / "manifest.safe").getroot()
    streams = [e for e in root.iter() if e.tag.endswith("byteStream")]
    assert len(streams) == 2 + 7
    for stream in streams:
        location = next(e for e in stream if e.tag.endswith("fileLocation"))
        checksum = next(e for e in stream if e.tag.endswith("checksum"))
        data = (safe / location.attrib["href"]).read_bytes()
        assert int(stream.attrib["size"]) == len(data)
        assert checksum.text == hashlib.md5(data).hexdigest().upper()


def test_small_and_invalid_arguments(tmp_path: Path) -> None:
    tiny = generate(tmp_path / "tiny", parcels=1, scenes=1, seed=0)
    assert (tiny.n_parcels, tiny.n_invalid, len(tiny.products)) == (1, 0, 1)
    assert tiny.invalid_parcels_path.read_text() == ""
    for kwargs in ({"parcels": 0}, {"scenes": 0}, {"scenes": 400}, {"seed": -1}):
        with pytest.raises(ValueError):
            generate(tmp_path / "bad", **kwargs)  # type: ignore[arg-type]


def test_demo_data_cli_writes_s1_card_on_request(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from cbmflow.dev.cli import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "world"
    res = CliRunner().invoke(
        app,
        ["demo-data", "--out", str(out), "--parcels", "20", "--scenes", "1", "--s1-scenes", "2", "--c6-scenes", "1"],
    )
    assert res.exit_code == 0, res.output
    assert "1 S2 products, 3 S1 CARD products" in res.output
    assert len(list((out / "products").glob("*.tif"))) == 3
    with (out / "truth.csv").open() as fh:
        bands = {row["band"] for row in csv.DictReader(fh)}
    assert {"VVb", "VHb", "VVc", "VHc"} <= bands


def test_world_tile_is_the_real_s2_tile() -> None:
    """The demo's S2 products and S1 CARD made on card.mgrs's grid must share one 10 m grid."""
    from card import testworld
    from card.mgrs import tile_geobox

    box = tile_geobox(testworld.TILE_ID)
    assert box.crs.upper() == f"EPSG:{testworld.TILE_EPSG}"
    assert (box.transform.c, box.transform.f) == (testworld.TILE_ULX_M, testworld.TILE_ULY_M)
    assert box.shape == (testworld.TILE_SIZE_M // 10, testworld.TILE_SIZE_M // 10)
