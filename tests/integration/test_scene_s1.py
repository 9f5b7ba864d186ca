"""Sentinel-1 CARD (backscatter ``bs``, coherence ``c6``) through the worker path, on real servers.

Generated CARD COGs are watched from the static STAC catalogue, queued on RabbitMQ, extracted by
a worker into ``sigs_<year>`` and served by the API; the rows are held against the generator's
truth (its own point-in-polygon labels and the values it wrote) and against rasterstats on the
same rasters. The reader (``card/s1.py``) on its own, on both layouts (cbmflow's CARD COG and
JRC's BEAM-DIMAP archive), is tested in ``tests/unit/test_card_s1.py``.
"""

from __future__ import annotations

import math
import shutil
import threading
from collections import Counter
from pathlib import Path

import geopandas as gpd
import numpy as np
import psycopg2
import pytest
import rasterio
from rasterstats import zonal_stats
from s1_products import _card, _read_pol, _truth, _write_tif, to_dimap
from starlette.testclient import TestClient

from api.app import create_app
from api.users import upsert_user
from card.testworld import WorldSummary, generate
from catalog_watcher.service import watch_once
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
