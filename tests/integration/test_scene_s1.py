"""Sentinel-1 CARD (backscatter ``bs``, coherence ``c6``) through the worker path, on real servers.

Generated CARD COGs are watched from the static STAC catalogue, queued on RabbitMQ, extracted by
a worker into ``sigs_<year>`` and served by the API; the rows are held against the generator's
truth (its own point-in-polygon labels and the values it wrote) and against rasterstats on the
same rasters. The reader (``card/s1.py``) is checked on both layouts, cbmflow's CARD COG and
JRC's BEAM-DIMAP archive, including every way a product can be unusable.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import psycopg2
import pytest
import rasterio
import shapely.geometry
from rasterio.crs import CRS
from rasterstats import zonal_stats
from starlette.testclient import TestClient

from api.app import create_app
from api.users import upsert_user
from card.s1 import MissingPolarisationError, open_s1_card
from card.testworld import WorldSummary, generate
from catalog_watcher.service import watch_once
from catalog_watcher.stac import iter_scenes
from cbmflow import db
from cbmflow.dev.verify import verify_truth
from cbmflow.ops.jobs import retry
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import ApiSettings, BusSettings, WatchSettings, WorkerSettings
from worker.consumer import Worker

# rasterstats still multiplies affine matrices with "*".
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

YEAR = 2024
ALL_COLLECTIONS = ["sentinel-2-l2a", "sentinel-1-card-bs", "sentinel-1-card-c6"]
STATS = ("count", "mean", "std", "min", "max", "p25", "p50", "p75")
DB_BAND = {("bs", "VV"): "VVb", ("bs", "VH"): "VHb", ("c6", "VV"): "VVc", ("c6", "VH"): "VHc"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("s1world"), parcels=60, scenes=1, seed=21, s1_scenes=4, c6_scenes=2)


def _card(name: str) -> str:
    return "bs" if name.endswith("_CARD_BS") else "c6"


def _truth(path: Path) -> dict[tuple[str, str, str], tuple[int, float]]:
    with path.open() as fh:
        return {
            (r["parcel_id"], r["product_id"], r["band"]): (int(r["count"]), float(r["mean"]))
            for r in csv.DictReader(fh)
        }


def _write_tif(path: Path, bands: list[tuple[str, np.ndarray[Any, Any]]], like: Path, dtype: str = "float32") -> None:
    """A GeoTIFF on ``like``'s grid with the given (description, array) bands, in that order."""
    with rasterio.open(like) as src:
        profile = {"crs": src.crs, "transform": src.transform, "width": src.width, "height": src.height}
    with rasterio.open(
        path, "w", driver="GTiff", count=len(bands), dtype=dtype, nodata=None if dtype != "float32" else math.nan,
        **profile,
    ) as dst:  # fmt: skip
        for k, (desc, array) in enumerate(bands, start=1):
            dst.write(array.astype(dtype), k)
            if desc:
                dst.set_band_description(k, desc)


def _read_pol(tif: Path) -> dict[str, np.ndarray[Any, Any]]:
    """The COG's bands by description (read independently of card.s1)."""
    with rasterio.open(tif) as src:
        return {d: src.read(k) for k, d in enumerate(src.descriptions, start=1)}


def to_dimap(tif: Path, dest: Path, *, names: dict[str, str] | None = None, dim: bool = True) -> Path:
    """Re-write a CARD COG as SNAP/JRC would have: ``<ref>/<ref>.dim`` + ``<ref>.data/<band>.img``
    (ENVI float32), no-data written as 0.0 and declared in the ``.dim``. Returns ``<ref>/``."""
    ref = tif.stem
    names = names or {"VV": "Gamma0_VV", "VH": "Gamma0_VH"}
    root = dest / ref
    data = root / f"{ref}.data"
    data.mkdir(parents=True)
    with rasterio.open(tif) as src:
        crs, transform, width, height = src.crs, src.transform, src.width, src.height
    infos, files = [], []
    for k, (pol, array) in enumerate(sorted(_read_pol(tif).items())):
        name = names[pol]
        with rasterio.open(
            data / f"{name}.img", "w", driver="ENVI", width=width, height=height, count=1, dtype="float32",
            crs=crs, transform=transform,
        ) as dst:  # fmt: skip
            dst.write(np.where(np.isnan(array), np.float32(0.0), array), 1)
        files.append(
            f'    <Data_File>\n      <DATA_FILE_PATH href="{ref}.data/{name}.hdr" />\n'
            f"      <BAND_INDEX>{k}</BAND_INDEX>\n    </Data_File>"
        )
        infos.append(
            f"    <Spectral_Band_Info>\n      <BAND_INDEX>{k}</BAND_INDEX>\n      <BAND_NAME>{name}</BAND_NAME>\n"
            "      <DATA_TYPE>float32</DATA_TYPE>\n      <PHYSICAL_UNIT>intensity</PHYSICAL_UNIT>\n"
            "      <NO_DATA_VALUE_USED>true</NO_DATA_VALUE_USED>\n      <NO_DATA_VALUE>0.0</NO_DATA_VALUE>\n"
            "    </Spectral_Band_Info>"
        )
    if dim:
        (root / f"{ref}.dim").write_text(
            '<?xml version="1.0" encoding="ISO-8859-1"?>\n<Dimap_Document name="{ref}.dim">\n'
            "  <Data_Access>\n    <DATA_FILE_FORMAT>ENVI</DATA_FILE_FORMAT>\n"
            + "\n".join(files)
            + "\n  </Data_Access>\n  <Image_Interpretation>\n"
            + "\n".join(infos)
            + "\n  </Image_Interpretation>\n</Dimap_Document>\n"
        )
    return root


# ------------------------------------------------------------------------------------------
# The reader
# ------------------------------------------------------------------------------------------


def test_reader_finds_polarisations_by_band_description(world: WorldSummary) -> None:
    assert len(world.s1_products) == 6
    assert [_card(n) for n in world.s1_products] == ["bs"] * 4 + ["c6"] * 2
    for name, tif in zip(world.s1_products, world.s1_product_paths, strict=True):
        product = open_s1_card(tif)
        assert (product.product_name, product.layout, product.epsg, product.crs) == (
            name,
            "geotiff",
            32632,
            "EPSG:32632",
        )
        # The generator writes coherence VH first: the index must follow the descriptions.
        want = {"VV": 1, "VH": 2} if _card(name) == "bs" else {"VV": 2, "VH": 1}
        assert {b.polarisation: b.band for b in product.bands} == want
        assert {b.path for b in product.bands} == {str(tif)}
        assert all(b.nodata is None for b in product.bands)  # NaN only
        with rasterio.open(tif) as src:
            assert src.dtypes == ("float32", "float32") and math.isnan(src.nodata)
            assert src.tags()["CARD"] == ("CARD-BS" if _card(name) == "bs" else "CARD-COH6")


def test_reader_refuses_what_it_cannot_identify(world: WorldSummary, tmp_path: Path) -> None:
    tif = world.s1_product_paths[0]
    pols = _read_pol(tif)

    vv_only = tmp_path / "vv_only.tif"
    _write_tif(vv_only, [("VV", pols["VV"])], tif)
    with pytest.raises(MissingPolarisationError) as missing:
        open_s1_card(vv_only)
    assert isinstance(missing.value, FileNotFoundError) and missing.value.polarisation == "VH"
    assert "polarisation VH" in str(missing.value) and "vv_only.tif" in str(missing.value)
    assert open_s1_card(vv_only, ("VV",)).band("VV").band == 1  # asking for VV only is fine
    with pytest.raises(MissingPolarisationError):
        open_s1_card(vv_only, ("VV",)).band("VH")

    undescribed = tmp_path / "undescribed.tif"
    _write_tif(undescribed, [("", pols["VV"]), ("", pols["VH"])], tif)
    with pytest.raises(ValueError, match="no description"):
        open_s1_card(undescribed)

    half = tmp_path / "half.tif"  # VV described, the other band not: which one is VH is unknown
    _write_tif(half, [("VV", pols["VV"]), ("", pols["VH"])], tif)
    with pytest.raises(ValueError, match="VH band cannot be identified"):
        open_s1_card(half)

    twice = tmp_path / "twice.tif"
    _write_tif(twice, [("VV", pols["VV"]), ("VV", pols["VH"])], tif)
    with pytest.raises(ValueError, match="described as VV"):
        open_s1_card(twice)

    scaled = tmp_path / "uint16.tif"  # e.g. DN-scaled dB: not the CARD format
    _write_tif(scaled, [(p, np.nan_to_num(pols[p]) * 1000) for p in ("VV", "VH")], tif, dtype="uint16")
    with pytest.raises(ValueError, match="uint16, a CARD raster must be float32"):
        open_s1_card(scaled)

    described = tmp_path / "gamma0_names.tif"  # SNAP-style descriptions are understood
    _write_tif(described, [("Gamma0_VH", pols["VH"]), ("Gamma0_VV", pols["VV"])], tif)
    assert {b.polarisation: b.band for b in open_s1_card(described).bands} == {"VV": 2, "VH": 1}

    with pytest.raises(FileNotFoundError):
        open_s1_card(tmp_path / "nowhere.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(ValueError, match="cannot read raster"):
        open_s1_card(broken)


def test_reader_accepts_jrc_beam_dimap(world: WorldSummary, tmp_path: Path) -> None:
    tif = world.s1_product_paths[1]
    root = to_dimap(tif, tmp_path / "bs")
    ref = tif.stem
    for given in (root, root / f"{ref}.dim", root / f"{ref}.data"):
        product = open_s1_card(given)
        assert (product.product_name, product.layout, product.epsg) == (ref, "dimap", 32632)
        assert {b.polarisation: Path(b.path).name for b in product.bands} == {
            "VV": "Gamma0_VV.img",
            "VH": "Gamma0_VH.img",
        }
        assert all(b.band == 1 and b.nodata == 0.0 for b in product.bands)

    # Coherence: files named with _VV/_VH, found by name when there is no .dim; SNAP's 0.0 no-data.
    coh = to_dimap(
        world.s1_product_paths[4],
        tmp_path / "c6",
        names={"VV": "coh_IW2_VV_03May2024_09May2024", "VH": "coh_IW2_VH_03May2024_09May2024"},
        dim=False,
    )
    product = open_s1_card(coh)
    assert {b.polarisation: Path(b.path).name for b in product.bands} == {
        "VV": "coh_IW2_VV_03May2024_09May2024.img",
        "VH": "coh_IW2_VH_03May2024_09May2024.img",
    }
    assert all(b.nodata == 0.0 for b in product.bands)

    data = root / f"{ref}.data"
    (data / "Gamma0_VH.hdr").unlink()
    with pytest.raises(MissingPolarisationError, match="VH.*no ENVI header"):
        open_s1_card(root)
    (data / "Gamma0_VH.img").unlink()
    with pytest.raises(MissingPolarisationError, match="polarisation VH.*Gamma0_VH is listed but its file is missing"):
        open_s1_card(root)
    (root / f"{ref}.dim").unlink()  # without the .dim, the .data directory is all there is
    with pytest.raises(MissingPolarisationError, match="polarisation VH has no band file"):
        open_s1_card(root)
    assert open_s1_card(root, ("VV",)).band("VV").nodata == 0.0

    ambiguous = to_dimap(tif, tmp_path / "amb", names={"VV": "Sigma0_VV", "VH": "Beta0_VV"}, dim=False)
    with pytest.raises(ValueError, match="2 bands could be VV"):
        open_s1_card(ambiguous)
    with pytest.raises(FileNotFoundError):
        open_s1_card(tmp_path / "nothing" / "x.dim")


# ------------------------------------------------------------------------------------------
# The worker path
# ------------------------------------------------------------------------------------------


def _run_worker(dsn: str, bus: BusSettings, jobs: int, timeout_s: float = 120) -> Worker:
    """A real consumer in a thread (signal handlers stay pytest's), stopping after ``jobs`` verdicts."""
    worker = Worker(
        dsn=dsn, bus=bus, settings=WorkerSettings(heartbeat_s=0.5, metrics_port=-1, idle_exit_s=30), max_jobs=jobs
    )
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), "worker did not finish its jobs in time"
    assert rc == [0] and worker.done == jobs
    return worker


def _scenes(dsn: str) -> dict[str, tuple[int, str, int, str | None, str]]:
    with db.transaction(dsn) as cur:
        cur.execute("SELECT product_id, id, status, attempts, reason, card FROM scenes")
        return {r[0]: (int(r[1]), r[2], int(r[3]), r[4], r[5]) for r in cur.fetchall()}


def _sigs(dsn: str) -> dict[tuple[str, str, str], tuple[float, ...]]:
    """(parcel_id, product_id, band) → (count, mean, std, min, max, p25, p50, p75)."""
    with db.transaction(dsn) as cur:
        cur.execute(
            "SELECT p.parcel_id, s.product_id, g.band, g.count, g.mean, g.std, g.min, g.max, g.p25, g.p50, g.p75"
            " FROM ms.sigs_2024 g JOIN ms.parcels_2024 p USING (pid) JOIN scenes s ON s.id = g.scene_id"
        )
        return {(r[0], r[1], r[2]): tuple(float(v) for v in r[3:]) for r in cur.fetchall()}


def _rasterstats(tif: Path, parcels: gpd.GeoDataFrame, card: str) -> dict[tuple[str, str], tuple[float, ...]]:
    """Independent zonal statistics: rasterstats, pixel centres (all_touched=False), NaN excluded,
    on the parcels reprojected by PROJ (not PostGIS); bands found by description, not by our reader."""
    with rasterio.open(tif) as src:
        by_desc = {d: k for k, d in enumerate(src.descriptions, start=1)}
        crs = src.crs
    geoms = parcels.to_crs(crs).geometry
    out: dict[tuple[str, str], tuple[float, ...]] = {}
    for pol in ("VV", "VH"):
        rows = zonal_stats(
            list(geoms),
            str(tif),
            band=by_desc[pol],
            nodata=math.nan,
            all_touched=False,
            stats="count mean std min max percentile_25 percentile_50 percentile_75",
        )
        for pid, r in zip(parcels["parcel_id"], rows, strict=True):
            if r["count"]:
                out[(pid, DB_BAND[(card, pol)])] = (
                    r["count"], r["mean"], r["std"], r["min"], r["max"],
                    r["percentile_25"], r["percentile_50"], r["percentile_75"],
                )  # fmt: skip
    return out


@pytest.mark.timeout(300)
def test_s1_card_scenes_through_the_worker_into_sigs_and_the_api(
    world: WorldSummary, cbm_env: object, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path
) -> None:
    src = world.out
    out = tmp_path / "world"  # this test breaks and fixes products: it owns a copy
    shutil.copytree(src, out)
    products = {n: out / "products" / f"{n}.tif" for n in world.s1_products}
    bs = [n for n in world.s1_products if _card(n) == "bs"]
    c6 = [n for n in world.s1_products if _card(n) == "c6"]
    broken, dimap = bs[1], bs[2]
    truth = _truth(out / "truth.csv")
    assert {k[2] for k in truth if k[1] in products} == {"VVb", "VHb", "VVc", "VHc"}

    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", out / "aoi.geojson")
        report = import_parcels(cur, out / "parcels.gpkg", "ms", YEAR)
    assert report.rejected, "the world has invalid parcels on purpose"
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    watch = WatchSettings(catalog_url=str(out / "stac" / "catalog.json"), lookback_days=0, collections=ALL_COLLECTIONS)
    first = watch_once(dsn=pg_dsn, bus=bus, settings=watch)
    assert (first.seen, first.new, first.published) == (7, 7, 7)
    cards = Counter(s[4] for s in _scenes(pg_dsn).values())
    assert cards == {"s2": 1, "bs": 4, "c6": 2}

    # One product lost its VH band; another is served from a JRC-style BEAM-DIMAP archive instead.
    original = products[broken].read_bytes()
    _write_tif(products[broken], [("VV", _read_pol(products[broken])["VV"])], products[broken])
    archive = to_dimap(products[dimap], tmp_path / "archive")
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE scenes SET location = %s WHERE product_id = %s", (str(archive), dimap))

    _run_worker(pg_dsn, bus, jobs=7)
    state = _scenes(pg_dsn)
    assert {p: s[1] for p, s in state.items()} == {p: ("failed" if p == broken else "extracted") for p in state}
    reason = state[broken][3] or ""
    assert "polarisation VH" in reason and products[broken].name in reason, reason
    assert state[broken][2] == 1, "a missing polarisation is permanent: dead-lettered at once"

    # Every other scene: exactly the truth's rows, counts equal, means within 1e-6.
    got = _sigs(pg_dsn)
    assert not [k for k in got if k[1] == broken]
    want = {k: v for k, v in truth.items() if k[1] != broken}
    assert set(got) == set(want), set(got) ^ set(want)
    for key, (count, mean) in want.items():
        assert got[key][0] == count, (key, got[key], count)
        assert math.isclose(got[key][1], mean, rel_tol=1e-6), (key, got[key][1], mean)
    s1_rows = Counter(k[1] for k in got if k[1] in products)
    assert set(s1_rows) == set(products) - {broken} and min(s1_rows.values()) > 60

    # ... and every statistic equal to rasterstats on the same rasters (the DIMAP scene against its COG).
    imported = gpd.read_file(out / "parcels.gpkg", layer="parcels", engine="pyogrio")
    imported = imported[~imported["parcel_id"].isin({r[1] for r in report.rejected})]
    compared = 0
    for name, tif in products.items():
        if name == broken:
            continue
        ref = _rasterstats(tif, imported, _card(name))
        ours = {(k[0], k[2]): v for k, v in got.items() if k[1] == name}
        assert set(ours) == set(ref), name
        for key, r in ref.items():
            assert ours[key][0] == r[0], (name, key)
            # rasterstats accumulates float32 (ours float64): they agree to ~1e-7 relative.
            np.testing.assert_allclose(ours[key][1:], r[1:], rtol=2e-6, err_msg=f"{name} {key}")
            compared += 1
    assert compared == sum(s1_rows.values())
    # The bs products miss the west of the AOI (a swath edge): parcels beyond it have no bs row,
    # parcels it cuts have fewer pixels than on the full S2 grid (the clear S2 scene), never more.
    with rasterio.open(products[bs[0]]) as ds:
        edge_x = ds.transform.c
    bounds = imported.to_crs(32632).bounds
    cut = imported["parcel_id"][(bounds.minx < edge_x) & (bounds.maxx > edge_x)].tolist()
    west = imported["parcel_id"][bounds.maxx < edge_x].tolist()
    assert cut and west
    assert not [p for p in west if (p, bs[0], "VVb") in got]
    s2_name = world.products[0]
    assert all(got.get((p, bs[0], "VVb"), (0,))[0] < got[(p, s2_name, "B04")][0] for p in cut)

    # The fix: the product is restored, its dead letter re-published; the rest is untouched.
    products[broken].write_bytes(original)
    rr = retry(pg_dsn, bus, dead_lettered=True)
    assert rr.republished == [state[broken][0]] and rr.letters_removed == 1
    # Re-extracting a finished scene replaces its rows: a stale row of it must go.
    sid = state[c6[0]][0]
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "INSERT INTO ms.sigs_2024 (pid, scene_id, band, count) SELECT min(pid), %s, 'VVx', 1 FROM ms.parcels_2024",
            (sid,),
        )
    assert retry(pg_dsn, bus, scenes=[sid]).republished == [sid]
    _run_worker(pg_dsn, bus, jobs=2)
    state = _scenes(pg_dsn)
    assert {s[1] for s in state.values()} == {"extracted"}
    assert {p: s[2] for p, s in state.items()} == {p: 2 if p in (broken, c6[0]) else 1 for p in state}
    tally = verify_truth(pg_dsn, out / "truth.csv", "ms", YEAR)
    assert tally.ok and tally.expected == world.truth_rows == len(truth), tally
    assert tally.extra == 0, "the stale row of the re-extracted scene is gone"

    # The API serves them as JRC's bs / c6 time series.
    with db.transaction(pg_dsn) as cur:
        upsert_user(cur, "ana", "ana-secret-123", datasets=["ms"])
    parcel = max((k[0] for k in truth if k[1] in products), key=lambda p: sum(1 for k in truth if k[0] == p))
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT product_id, date_part('epoch', acquired_at) FROM scenes")
        acquired = {p: float(t) for p, t in cur.fetchall()}
    with TestClient(create_app(pg_dsn, ApiSettings())) as client:
        for tstype, names, bands in (("bs", bs, ("VHb", "VVb")), ("c6", c6, ("VHc", "VVc"))):
            url = f"/query/parcelTimeSeries?aoi=ms&year={YEAR}&pid={parcel}&tstype={tstype}"
            first_resp = client.get(url, auth=("ana", "ana-secret-123"))
            assert first_resp.status_code == 200, first_resp.text
            body = first_resp.json()
            again = client.get(url, auth=("ana", "ana-secret-123"))  # credentials now cached: same answer
            assert again.status_code == 200 and again.json() == body
            expected = sorted(
                (acquired[n], b) for n in names for b in bands if (parcel, n, b) in truth
            )  # by time, then band
            assert list(zip(body["date_part"], body["band"], strict=True)) == expected
            assert len(expected) >= 2 * (len(names) - 1)
            for t, b, count, mean in zip(body["date_part"], body["band"], body["count"], body["mean"], strict=True):
                name = next(n for n in names if acquired[n] == t)
                assert count == truth[(parcel, name, b)][0]
                assert math.isclose(mean, truth[(parcel, name, b)][1], rel_tol=1e-6)
            assert "hist" not in body
        s2 = client.get(
            f"/query/parcelTimeSeries?aoi=ms&year={YEAR}&pid={parcel}&tstype=s2", auth=("ana", "ana-secret-123")
        )
        assert s2.status_code == 200 and not set(s2.json()["band"]) & {"VVb", "VHb", "VVc", "VHc"}


def test_an_unknown_card_is_still_refused(pg_dsn: str, tmp_path: Path) -> None:
    """Dispatch is by card: bs and c6 now have an extractor, anything else stays UnsupportedCard."""
    from worker.consumer import EXTRACTORS, SceneJobs, UnsupportedCard
    from worker.scene import ClaimedScene, extract_card

    assert EXTRACTORS["bs"] is EXTRACTORS["c6"] is extract_card
    jobs = SceneJobs(pg_dsn, "me", WorkerSettings(metrics_port=-1))
    conn = psycopg2.connect(pg_dsn)
    try:
        with pytest.raises(UnsupportedCard, match="'c1'"):
            jobs.run(conn, ClaimedScene(id=1, product_id="x", card="c1", location=str(tmp_path), year=YEAR))
    finally:
        conn.close()


def test_counts_are_per_grid_and_per_card(world: WorldSummary) -> None:
    """The truth itself: bs (10 m) and c6 (20 m) rows differ in count as their grids do, and every
    S1 value the truth averaged is finite and in range (linear backscatter > 0, coherence in [0, 1])."""
    truth = _truth(world.truth_path)
    by_card: dict[str, list[int]] = defaultdict(list)
    for (_, product, _), (count, mean) in truth.items():
        if product in world.s1_products:
            by_card[_card(product)].append(count)
            assert math.isfinite(mean) and mean > 0
            if _card(product) == "c6":
                assert mean <= 1
            else:
                assert mean < 1  # linear, not dB
    assert np.median(by_card["bs"]) > 3 * np.median(by_card["c6"])
    for tif in world.s1_product_paths:
        with rasterio.open(tif) as src:
            assert src.crs == CRS.from_epsg(32632)
            data = src.read()
        assert np.isnan(data).any() and np.isfinite(data).mean() > 0.9


def test_s1_world_is_deterministic_catalogued_and_leaves_s2_alone(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", parcels=20, scenes=1, seed=4, s1_scenes=2, c6_scenes=1)
    b = generate(tmp_path / "b", parcels=20, scenes=1, seed=4, s1_scenes=2, c6_scenes=1)
    plain = generate(tmp_path / "c", parcels=20, scenes=1, seed=4)
    assert a.s1_products == b.s1_products and len(a.s1_products) == 3 and plain.s1_products == ()
    for pa, pb in zip(a.s1_product_paths, b.s1_product_paths, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    # Asking for S1 changes nothing of the S2 part: same SAFE bytes, the S2 truth rows first, as they were.
    for safe in plain.product_paths:
        for f in sorted(p for p in safe.rglob("*") if p.is_file()):
            assert f.read_bytes() == (a.out / "products" / safe.name / f.relative_to(safe)).read_bytes()
    plain_truth = plain.truth_path.read_text()
    assert a.truth_path.read_text().startswith(plain_truth) and a.truth_rows > plain.truth_rows

    # The catalogue is read by the watcher's own code: card from the collection, location = the COG.
    aoi = shapely.geometry.shape(json.loads(a.aoi_path.read_text())["features"][0]["geometry"])
    records = list(iter_scenes(str(a.stac_catalog_path), ALL_COLLECTIONS, aoi, lookback_days=0))
    s1 = {r.product_id: r for r in records if r.card != "s2"}
    assert set(s1) == set(a.s1_products)
    for name, tif in zip(a.s1_products, a.s1_product_paths, strict=True):
        rec = s1[name]
        assert (rec.card, rec.mission, rec.sensor, rec.location) == (_card(name), "S1A", "IW", str(tif.resolve()))
        assert rec.footprint.intersects(aoi) and not rec.footprint.contains(aoi), "a swath edge crosses the AOI"
    s2_only = list(iter_scenes(str(a.stac_catalog_path), ["sentinel-2-l2a"], aoi, lookback_days=0))
    assert [r.card for r in s2_only] == ["s2"], "the default watch sees no S1"
