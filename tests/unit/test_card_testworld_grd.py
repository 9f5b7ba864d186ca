"""The synthetic Sentinel-1 GRD generator (card.testworld_grd) and its hook in the test world.

Evidence, not tautology: the generator renders DN forwards (radar pixel → ground point → truth γ0),
card.s1grd reads and geocodes backwards; the XML shapes are compared with the real S1B product in
../shared; parcel membership comes from shapely on the GeoPackage, not from the generator.
"""

from __future__ import annotations

import csv
import hashlib
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer

from card.geobox import GeoBox
from card.s1grd.bs import generate_bs
from card.s1grd.dem import FlatDem
from card.s1grd.geocode import Geocoder, ecef
from card.s1grd.safe import GrdProduct, open_grd
from card.testworld import WorldSummary, generate
from card.testworld_grd import (
    BackscatterField,
    GrdAcquisition,
    SyntheticGrd,
    interior,
    radar_position,
    relative_to_absolute_orbit,
    write_grd,
)
from catalog_watcher.stac import iter_static_items, to_record

REAL = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")
NAME_RE = re.compile(r"^S1A_IW_GRDH_1SDV_(\d{8}T\d{6})_(\d{8}T\d{6})_(\d{6})_([0-9A-F]{6})_([0-9A-F]{4})$")
BLOCK_PX = 20


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- a small product on a synthetic field: blocks of known γ0 and a calm-water patch (γ0 = 0) -----

SMALL_GRID = GeoBox((200, 200), Affine(10, 0.0, 650_000, 0.0, -10, 5_350_020), 32632)


def _small_field() -> BackscatterField:
    rng = np.random.default_rng(7)
    blocks = rng.uniform(0.01, 0.2, (10, 10))
    vv = np.kron(blocks, np.ones((BLOCK_PX, BLOCK_PX))).astype(np.float32)
    vh = (0.2 * vv).astype(np.float32)
    for a in (vv, vh):
        a[80:120, 80:120] = 0.0
    return BackscatterField(SMALL_GRID, {"VV": vv, "VH": vh}, {"VV": 0.05, "VH": 0.01})


def _acquisition() -> GrdAcquisition:
    when = datetime(2024, 5, 3, 5, 25, 41, tzinfo=UTC)
    return GrdAcquisition(when, relative_to_absolute_orbit("S1A", when, 117), 0x05A1B2, 0x1C3D)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SyntheticGrd:
    return write_grd(tmp_path_factory.mktemp("grd"), _acquisition(), _small_field(), zip_product=True)


@pytest.fixture(scope="module")
def small_product(small: SyntheticGrd) -> GrdProduct:
    return open_grd(small.safe)


def test_product_layout_name_and_reader(small: SyntheticGrd, small_product: GrdProduct) -> None:
    m = NAME_RE.match(small.name)
    assert m is not None, small.name
    assert small.safe.name == f"{small.name}.SAFE" and small.acquisition.relative_orbit == 117
    assert small_product.ipf_version == "003.71"
    assert list(small_product.polarisations) == ["VV", "VH"]
    for pol, p in small_product.polarisations.items():
        a = p.annotation
        assert (a.mission, a.mode, a.pass_direction, a.polarisation) == ("S1A", "IW", "Descending", pol)
        assert (a.n_lines, a.n_samples) == small.shape
        assert a.range_pixel_spacing_m == 10.0 and p.noise.format == "range+azimuth"
        assert f"{a.t0.astype('datetime64[s]')}".replace("-", "").replace(":", "") == m.group(1)
        with rasterio.open(p.measurement) as src:
            assert (src.height, src.width, src.dtypes[0]) == (a.n_lines, a.n_samples, "uint16")
            gcps, crs = src.gcps
            assert len(gcps) == a.grid.line.size and crs.to_epsg() == 4326
            assert src.tags()["TIFFTAG_IMAGEDESCRIPTION"] == "Sentinel-1A IW GRD HR L1"
    # the manifest lists every file with its size and MD5
    manifest = (small.safe / "manifest.safe").read_text()
    listed = dict(re.findall(r'href="\./([^"]+)"/>\s*<checksum checksumName="MD5">([0-9a-f]{32})<', manifest))
    files = {p.relative_to(small.safe).as_posix() for p in small.safe.rglob("*") if p.is_file()}
    assert set(listed) == files - {"manifest.safe"}
    for rel, md5 in listed.items():
        assert hashlib.md5((small.safe / rel).read_bytes()).hexdigest() == md5
    # the zip (ESA's packaging: <name>.SAFE/ inside) reads the same
    assert small.zip is not None
    zipped = open_grd(small.zip)
    assert zipped.product_name == small.name
    assert zipped.polarisations["VV"].measurement.startswith("/vsizip/")


def _element_paths(root: ET.Element) -> set[str]:
    out: set[str] = set()

    def walk(el: ET.Element, prefix: str) -> None:
        path = f"{prefix}/{el.tag}"
        out.add(path)
        for child in el:
            walk(child, path)

    walk(root, "")
    return out


def _counts_agree(root: ET.Element) -> bool:
    """Every ``count`` attribute counts the children or the listed values (complex lists: pairs)."""
    for el in root.iter():
        if "count" in el.attrib:
            n = len(el) if len(el) else len((el.text or "").split())
            if n not in (int(el.attrib["count"]), 2 * int(el.attrib["count"])):
                return False
    return True


def test_xml_has_the_real_products_element_names_and_nesting(small: SyntheticGrd) -> None:
    if not REAL.is_dir():
        pytest.skip(f"shared test data missing: {REAL}")
    pairs = [
        ("annotation/s1*-iw-grd-vv-*.xml", "annotation/s1*-iw-grd-vv-*.xml"),
        ("annotation/calibration/calibration-*-vv-*.xml", "annotation/calibration/calibration-*-vv-*.xml"),
        ("annotation/calibration/noise-*-vv-*.xml", "annotation/calibration/noise-*-vv-*.xml"),
        ("manifest.safe", "manifest.safe"),
    ]
    for ours_glob, real_glob in pairs:
        ours = ET.parse(next(small.safe.glob(ours_glob))).getroot()
        real = ET.parse(next(REAL.glob(real_glob))).getroot()
        assert ours.tag == real.tag
        extra = _element_paths(ours) - _element_paths(real)
        assert not extra, f"{ours_glob}: elements the real product does not have: {sorted(extra)[:5]}"
        assert _counts_agree(real) and _counts_agree(ours), ours_glob
    # the parts the reader relies on are all there (not just a subset of names)
    ann = ET.parse(next(small.safe.glob("annotation/s1a-iw-grd-vh-*.xml"))).getroot()
    for path in (
        "generalAnnotation/orbitList/orbit",
        "coordinateConversion/coordinateConversionList/coordinateConversion",
    ):
        assert len(ann.findall(path)) >= 3


def test_geometry_agrees_with_the_reader_geocoder(small: SyntheticGrd, small_product: GrdProduct) -> None:
    a = small_product.polarisations["VV"].annotation
    geocoder = Geocoder(a)
    at_grid = geocoder.radar_position(ecef(a.grid.lon, a.grid.lat, a.grid.height))
    assert np.max(np.abs(at_grid.line - a.grid.line)) < 0.01
    assert np.max(np.abs(at_grid.pixel - a.grid.pixel)) < 0.01
    # off the grid too: random ground points, the generator's geometry vs the reader's
    rng = np.random.default_rng(3)
    lon = rng.uniform(a.grid.lon.min(), a.grid.lon.max(), 500)
    lat = rng.uniform(a.grid.lat.min(), a.grid.lat.max(), 500)
    line, sample = radar_position(small, lon, lat)
    pos = geocoder.radar_position(ecef(lon, lat, 0.0))
    assert np.max(np.abs(pos.line - line)) < 0.01 and np.max(np.abs(pos.pixel - sample)) < 0.01
    # physically a Sentinel-1 pass: ~693 km up, ~7.5 km/s, 10 s vectors, descending at ~38°
    altitude_km = (np.linalg.norm(a.orbit.pos, axis=1) - 6_366_000) / 1000
    assert np.all((altitude_km > 690) & (altitude_km < 720))
    assert np.allclose(np.linalg.norm(a.orbit.vel, axis=1), 7_590, rtol=0.002)  # real: 7591 m/s
    assert np.allclose(np.diff(a.orbit.t), 10.0) and np.all(a.orbit.vel[:, 2] < 0)
    assert 37.5 < a.incidence_mid_deg < 38.5
    assert 0.0014 < a.azimuth_time_interval_s < 0.0016


def test_ascending_pass_across_a_sub_swath_boundary(tmp_path: Path) -> None:
    """The other orbit branch, and a crop that straddles IW1|IW2 (36.28°): two azimuth noise blocks
    with different η, one γ0 recovered on both sides."""
    grid = SMALL_GRID[:120, :120]
    field = BackscatterField(grid, {"VV": np.full(grid.shape, 0.08, np.float32)}, {"VV": 0.08})
    when = datetime(2024, 5, 9, 17, 12, 30, tzinfo=UTC)
    acq = GrdAcquisition(when, relative_to_absolute_orbit("S1A", when, 44), 0x05A2C3, 0x2D4E, "S1A", "ascending", 36.28)
    grd = write_grd(tmp_path, acq, field, polarisations=("VV",))
    vv = open_grd(grd.safe).polarisations["VV"]
    a = vv.annotation
    assert a.pass_direction == "Ascending" and np.all(a.orbit.vel[:, 2] > 0)
    assert [b.swath for b in vv.noise.azimuth] == ["IW1", "IW2"]
    assert vv.noise.azimuth[0].values[0] != vv.noise.azimuth[1].values[0]
    pos = Geocoder(a).radar_position(ecef(a.grid.lon, a.grid.lat, a.grid.height))
    assert np.max(np.abs(pos.line - a.grid.line)) < 0.01 and np.max(np.abs(pos.pixel - a.grid.pixel)) < 0.01
    out = generate_bs(str(grd.safe), grid, FlatDem(), str(tmp_path / "bs"), quantity="gamma0")
    with rasterio.open(out.backscatter["VV"]) as src:
        x = src.read(1).astype(np.float64)
    boundary = vv.noise.azimuth[0].last_sample
    lon, lat = Transformer.from_crs(32632, 4326, always_xy=True).transform(
        *np.meshgrid(grid.x_centres(), grid.y_centres())
    )
    _, sample = radar_position(grd, lon, lat)
    for side in (sample < boundary - 2, sample > boundary + 2):
        assert side.sum() > 1000
        assert abs(x[side].mean() / 0.08 - 1) < 0.003 and np.percentile(np.abs(x[side] / 0.08 - 1), 99) < 0.03


def test_noise_floor_is_zero_and_fill_is_nan(small: SyntheticGrd, tmp_path: Path) -> None:
    pad = 50  # 500 m beyond the field: past the 300 m margin and the fill border
    grid = SMALL_GRID.shifted(rows=-pad, cols=-pad, shape=(200 + 2 * pad, 200 + 2 * pad))
    out = generate_bs(str(small.safe), grid, FlatDem(), str(tmp_path), quantity="gamma0")
    with rasterio.open(out.backscatter["VH"]) as src:
        vh = src.read(1)
    field = _small_field()
    inner = interior((field.gamma0["VH"] == 0).astype(np.int64)) & (field.gamma0["VH"] == 0)
    assert inner.sum() > 1000
    calm = vh[pad:-pad, pad:-pad][inner]
    assert np.all(calm == 0.0), "DN² ≤ η is a measurement of no backscatter: 0.0, not NaN"
    with rasterio.open(small.measurements["VH"]) as src:
        dn = src.read(1)
    assert dn[100:200, 100:200].min() > 0, "the calm patch is not fill"
    # where each output pixel falls in the image, by the generator's own geometry
    lon, lat = Transformer.from_crs(32632, 4326, always_xy=True).transform(
        *np.meshgrid(grid.x_centres(), grid.y_centres())
    )
    line, sample = radar_position(small, lon, lat)
    n_lines, n_samples = small.shape
    f = small.fill_px

    def inside(lo: float, hi_margin: float) -> npt.NDArray[np.bool_]:
        return (line >= lo) & (line <= n_lines - 1 - hi_margin) & (sample >= lo) & (sample <= n_samples - 1 - hi_margin)

    valid = inside(f + 1, f + 1)
    fill = ~inside(f - 1, f - 1)
    assert valid.sum() > 40_000 and fill.sum() > 10_000
    assert np.all(np.isfinite(vh[valid])) and np.all(np.isnan(vh[fill]))
    with rasterio.open(out.mask) as src:
        assert np.all(src.read(1)[fill] & 4)


def test_same_arguments_same_bytes(small: SyntheticGrd, tmp_path: Path) -> None:
    again = write_grd(tmp_path, _acquisition(), _small_field(), zip_product=True)
    assert again.name == small.name
    assert _hashes(again.safe) == _hashes(small.safe)
    assert again.zip is not None and small.zip is not None
    assert again.zip.read_bytes() == small.zip.read_bytes()


def test_bad_fields_are_refused(tmp_path: Path) -> None:
    field = _small_field()
    field.gamma0["VV"][0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        write_grd(tmp_path, _acquisition(), field)
    with pytest.raises(ValueError, match="margin_m"):
        write_grd(tmp_path, _acquisition(), _small_field(), margin_m=50.0)


# --- the test world's GRD inputs ----------------------------------------------------------------


def _generate(out: Path, grd_scenes: int) -> WorldSummary:
    return generate(out, parcels=40, scenes=1, seed=21, s1_scenes=2, grd_scenes=grd_scenes)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return _generate(tmp_path_factory.mktemp("grdworld"), grd_scenes=1)


def _world_grid(world: WorldSummary) -> GeoBox:
    with rasterio.open(next(world.product_paths[0].rglob("*_B02_10m.jp2"))) as src:
        return GeoBox.from_dataset(src)


def test_world_grd_items_are_card_inputs(world: WorldSummary) -> None:
    assert len(world.grd_products) == 1 and world.truth_grd_path is not None
    records = [to_record(item) for item in iter_static_items(str(world.stac_catalog_path))]
    inputs = [r for r in records if r.is_card_input]
    assert [r.product_name for r in inputs] == list(world.grd_products)
    rec = inputs[0]
    assert rec.card == "grd" and rec.collection == "sentinel-1-grd" and rec.relative_orbit == 117
    assert Path(rec.location) == world.grd_product_paths[0].resolve()
    assert rec.key == f"S1A_IW_GRDH_R117_{world.grd_products[0].split('_')[4]}"
    # not on a day of the CARD bs products (two products of one acquisition would disagree)
    bs_days = {r.acquired_at.date() for r in records if r.card == "bs"}
    assert len(bs_days) == 2 and rec.acquired_at.date() not in bs_days
    aoi = shapely.geometry.shape(_aoi(world))
    assert rec.footprint.contains(aoi)


def _aoi(world: WorldSummary) -> dict[str, object]:
    import json

    geometry: dict[str, object] = json.loads(world.aoi_path.read_text())["features"][0]["geometry"]
    return geometry


def test_card_bs_recovers_the_world_truth_per_parcel(world: WorldSummary, tmp_path: Path) -> None:
    grid = _world_grid(world)
    parcels = gpd.read_file(world.parcels_path, layer="parcels", engine="pyogrio").to_crs(32632)
    xs, ys = np.meshgrid(grid.x_centres(), grid.y_centres())
    labels = np.zeros(grid.shape, dtype=np.int64)
    ids: list[str] = []
    for geom, pid in zip(parcels.geometry, parcels.parcel_id, strict=True):
        if geom.is_valid:
            ids.append(pid)
            labels[shapely.contains_xy(geom, xs, ys)] = len(ids)
    inner = interior(labels)
    assert world.truth_grd_path is not None
    with world.truth_grd_path.open() as fh:
        truth = {(r["parcel_id"], r["band"]): r for r in csv.DictReader(fh)}
    assert {pid for pid, _ in truth} == set(ids)
    out = generate_bs(str(world.grd_product_paths[0]), grid, FlatDem(), str(tmp_path), quantity="gamma0")
    for pol, band, tol_many, tol_few in (("VV", "VVb", 0.005, 0.02), ("VH", "VHb", 0.01, 0.05)):
        with rasterio.open(out.backscatter[pol]) as src:
            x = src.read(1).astype(np.float64)
        assert not np.isnan(x).any()
        interior_err, all_err = [], []
        for k, pid in enumerate(ids, start=1):
            row = truth[(pid, band)]
            mine, core = labels == k, inner & (labels == k)
            assert int(row["count"]) == mine.sum() and int(row["interior_count"]) == core.sum()
            mean = float(row["mean"])
            all_err.append(x[mine].mean() / mean - 1)
            if core.sum():
                err = x[core].mean() / mean - 1
                interior_err.append(err)
                assert abs(err) <= (tol_many if core.sum() >= 25 else tol_few), (pid, band, core.sum(), err)
        assert np.median(np.abs(interior_err)) < tol_many / 2
        # edge pixels mix with the background through the bilinear resampling: a few percent
        assert abs(np.median(all_err)) < 0.03 and np.max(np.abs(all_err)) < 0.25


def test_grd_scenes_change_nothing_else(world: WorldSummary, tmp_path: Path) -> None:
    plain = _generate(tmp_path / "plain", grd_scenes=0)
    a, b = _hashes(plain.out), _hashes(world.out)
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert all(
        k.startswith(("products/s1/", "stac/sentinel-1-grd/")) or k in ("truth_grd.csv", "stac/catalog.json")
        for k in changed
    ), sorted(changed)[:5]
    assert plain.grd_products == () and plain.truth_grd_path is None and "products/s1" not in str(a)
    with pytest.raises(ValueError, match="grd_scenes"):
        generate(tmp_path / "too_many", parcels=20, scenes=1, seed=4, s1_scenes=10, grd_scenes=6)
