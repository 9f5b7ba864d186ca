"""``GenerateCard(bs)`` through the worker on real servers: a GRD card input → backscatter COGs on the
MGRS tiles under the AOI → one ``bs`` scene per tile → its extraction → ``VVb``/``VHb`` rows.

The GRD is the real sarsen IW GRDH annotation (``../shared/data/sentinel1``, VV; a VH copy of its XML
makes it dual-polarised) with a synthetic measurement: a constant DN per polarisation over the
radar window of the AOI (located from the annotation's own geolocation grid), fill elsewhere.
With ``beta0`` and no noise removal every valid output pixel is DN²/A_β², A_β the constant
``betaNought`` of the calibration XML: that is the truth the rows are held against, read from the
XML here, and the pixel counts are the tile lattice's pixel centres inside each parcel, computed
here with pyproj and shapely, not by the worker's code.

The watcher's side (a GRD writes its job, a duplicate does not, a changed product writes it again,
an SLC waits) and the job's faults (a second delivery, a crash mid-job found by its lease expiry,
an unreadable product) are checked on the same servers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2
import pyproj
import pytest
import rasterio
import shapely
import shapely.geometry
from affine import Affine
from moto.server import ThreadedMotoServer
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from stackfixtures import free_ports

from card import mgrs
from catalog_watcher.service import upsert_card_input
from catalog_watcher.stac import SceneRecord
from cbmflow import bus as busmod
from cbmflow import db, store
from cbmflow.messages import GenerateCard
from cbmflow.ops.jobs import retry
from cbmflow.outbox import enqueue, flush_outbox
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import BusSettings, WorkerSettings
from worker.consumer import Worker
from worker.deadletters import reconcile_dead_letters

SAFE = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")
DN = {"VV": 200, "VH": 90}
YEAR = 2021
CENTRE = (12.47, 41.90)  # lon, lat: Rome, inside the GRD and in the overlap of tiles 32TQM and 33TTG
PARCELS = {  # parcel id → (lon0, lat0, lon1, lat1), a few hectares each
    "p1": (12.4610, 41.8955, 12.4641, 41.8978),
    "p2": (12.4702, 41.9011, 12.4755, 41.9030),
    "p3": (12.4766, 41.8950, 12.4790, 41.8991),
    "p4": (12.4650, 41.9040, 12.4668, 41.9052),
}
FOOTPRINT = shapely.geometry.Polygon(
    [(14.925448, 40.876698), (11.865704, 41.281048), (12.189661, 42.780445), (15.321935, 42.376778)]
)


def _shared() -> Path:
    if not SAFE.is_dir():
        pytest.skip(f"shared test data missing: {SAFE.parent}")
    return SAFE


def _radar_window(annotation: Path, lon: float, lat: float, half_px: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) around (lon, lat), from the annotation's geolocation grid: the
    plane through the nearest grid points, so the window does not depend on the code under test."""
    root = ET.parse(annotation).getroot()
    pts = np.array(
        [
            [float(p.findtext(k) or 0) for k in ("longitude", "latitude", "line", "pixel")]
            for p in root.iter("geolocationGridPoint")
        ]
    )
    near = pts[np.argsort(np.hypot(pts[:, 0] - lon, pts[:, 1] - lat))[:6]]
    design = np.c_[near[:, 0], near[:, 1], np.ones(len(near))]
    line = float(np.array([lon, lat, 1.0]) @ np.linalg.lstsq(design, near[:, 2], rcond=None)[0])
    pixel = float(np.array([lon, lat, 1.0]) @ np.linalg.lstsq(design, near[:, 3], rcond=None)[0])
    lines = int(root.findtext("imageAnnotation/imageInformation/numberOfLines") or 0)
    samples = int(root.findtext("imageAnnotation/imageInformation/numberOfSamples") or 0)
    return (
        max(int(line) - half_px, 0),
        min(int(line) + half_px, lines),
        max(int(pixel) - half_px, 0),
        min(int(pixel) + half_px, samples),
    )


def dual_pol_safe(parent: Path) -> tuple[Path, dict[str, float]]:
    """A copy of the sarsen SAFE's XML with a VH twin of the VV files, and full-size sparse uint16
    measurements holding DN[pol] over the AOI's radar window; returns it and β0 per polarisation."""
    src = _shared()
    dst = parent / src.name
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in (".xml", ".safe"):
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst / f.relative_to(src))
    for f in list(dst.rglob("*-vv-*.xml")):
        text = f.read_text().replace("<polarisation>VV</polarisation>", "<polarisation>VH</polarisation>")
        f.with_name(f.name.replace("-vv-", "-vh-")).write_text(text)
    annotation = next((dst / "annotation").glob("s1?-*-grd-vv-*.xml"))
    root = ET.parse(annotation).getroot()
    lines = int(root.findtext("imageAnnotation/imageInformation/numberOfLines") or 0)
    samples = int(root.findtext("imageAnnotation/imageInformation/numberOfSamples") or 0)
    r0, r1, c0, c1 = _radar_window(annotation, *CENTRE, half_px=700)
    calibration = next((dst / "annotation" / "calibration").glob("calibration-*-vv-*.xml"))
    betas = {float(v) for e in ET.parse(calibration).getroot().iter("betaNought") for v in (e.text or "").split()}
    assert len(betas) == 1, "Sentinel-1 betaNought is one constant"
    (beta,) = betas
    truth: dict[str, float] = {}
    for pol, dn in DN.items():
        out = dst / "measurement" / annotation.with_suffix(".tiff").name.replace("-vv-", f"-{pol.lower()}-")
        out.parent.mkdir(parents=True, exist_ok=True)
        profile = {"driver": "GTiff", "width": samples, "height": lines, "count": 1, "dtype": "uint16"}
        tiling = {"tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "sparse_ok": True}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # radar geometry: no transform
            with rasterio.open(out, "w", **profile, **tiling) as ds:
                ds.write(np.full((r1 - r0, c1 - c0), dn, np.uint16), 1, window=Window(c0, r0, c1 - c0, r1 - r0))
        truth[pol] = float(np.float32(dn * dn / beta**2))
    return dst, truth


@pytest.fixture(scope="module")
def grd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    return dual_pol_safe(tmp_path_factory.mktemp("grd"))


def _world(dsn: str, tmp: Path) -> None:
    aoi = shapely.geometry.box(CENTRE[0] - 0.015, CENTRE[1] - 0.011, CENTRE[0] + 0.015, CENTRE[1] + 0.011)
    (tmp / "aoi.geojson").write_text(
        json.dumps({"type": "Feature", "properties": {}, "geometry": aoi.__geo_interface__})
    )
    features = [
        {"type": "Feature", "properties": {"parcel_id": pid}, "geometry": shapely.geometry.box(*b).__geo_interface__}
        for pid, b in PARCELS.items()
    ]
    (tmp / "parcels.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with db.transaction(dsn) as cur:
        add_aoi(cur, "rome", tmp / "aoi.geojson")
        import_parcels(cur, tmp / "parcels.geojson", "rome", YEAR, id_column="parcel_id", srid=32633)


def _record(location: str, *, card: str = "grd", checksum: str = "", name: str = "") -> SceneRecord:
    name = name or SAFE.name.removesuffix(".SAFE")
    return SceneRecord(
        product_id=name,
        product_name=name,
        mission=name[:3],
        sensor="IW_GRDH" if card == "grd" else "IW_SLC_",
        card=card,
        acquired_at=datetime(2021, 12, 23, 5, 11, 22, tzinfo=UTC),
        footprint=FOOTPRINT,
        location=location,
        updated="2021-12-23T08:00:00Z",
        acq_key=f"{name[:3]}_IW_{'GRDH' if card == 'grd' else 'SLC'}_R117_20211223T051122",
        checksum=checksum,
        relative_orbit=117,
    )


def _run_worker(dsn: str, bus: BusSettings, jobs: int, tmp: Path, **extra: Any) -> Worker:
    options: dict[str, Any] = {
        "heartbeat_s": 0.5,
        "metrics_port": -1,
        "idle_exit_s": 40,
        "card_quantity": "beta0",
        "card_denoise": False,
        "card_output_url": str(tmp / "store"),
        "card_scratch_dir": str(tmp / "scratch"),
    }
    settings = WorkerSettings(**{**options, **extra})
    worker = Worker(dsn=dsn, bus=bus, settings=settings, max_jobs=jobs)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    t.start()
    t.join(150)
    assert not t.is_alive(), "worker did not finish its jobs in time"
    assert rc == [0] and worker.done == jobs
    return worker


def _expected_counts(tile: str, grid_transform: Any, shape: tuple[int, int]) -> dict[str, int]:
    """Pixel centres of the tile's lattice inside each parcel (as stored: EPSG:32633, then in the tile's CRS)."""
    crs = mgrs.tile_geobox(tile).crs
    to_store = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True).transform
    to_tile = pyproj.Transformer.from_crs("EPSG:32633", crs, always_xy=True).transform
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    xs, ys = grid_transform @ (cols + 0.5, rows + 0.5)
    out = {}
    for pid, b in PARCELS.items():
        stored = shapely.transform(shapely.geometry.box(*b), to_store, interleaved=False)
        poly = shapely.transform(stored, to_tile, interleaved=False)
        out[pid] = int(shapely.contains_xy(poly, xs.ravel(), ys.ravel()).sum())
        assert out[pid] > 20, (pid, out[pid])
    return out


def _rows(dsn: str) -> dict[tuple[str, str, str], tuple[int, float, float]]:
    """(parcel, scene product, band) → (count, mean, std)."""
    with db.transaction(dsn) as cur:
        cur.execute(
            "SELECT p.parcel_id, s.product_id, g.band, g.count, g.mean, g.std"
            " FROM rome.sigs_2021 g JOIN rome.parcels_2021 p USING (pid) JOIN scenes s ON s.id = g.scene_id"
        )
        return {(r[0], r[1], r[2]): (int(r[3]), float(r[4]), float(r[5])) for r in cur.fetchall()}


def _one(dsn: str, query: str, args: tuple[Any, ...] = ()) -> Any:
    with db.transaction(dsn) as cur:
        cur.execute(query, args)
        return cur.fetchall()


@pytest.mark.timeout(300)
def test_a_grd_becomes_bs_scenes_per_tile_whose_rows_equal_beta0(
    grd: tuple[Path, dict[str, float]], cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path
) -> None:
    safe, truth = grd
    _world(pg_dsn, tmp_path)
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    with db.transaction(pg_dsn) as cur:
        input_id, what = upsert_card_input(cur, _record(str(safe)))
    assert what == "new"
    assert flush_outbox(pg_dsn, bus) == 1
    assert _one(pg_dsn, "SELECT status FROM card_inputs WHERE id = %s", (input_id,)) == [("queued",)]

    tiles = sorted(mgrs.tiles_intersecting(shapely.union_all([shapely.geometry.box(*b) for b in PARCELS.values()])))
    assert tiles == ["32TQM", "33TTG"], "the parcels lie where two tiles (two UTM zones) overlap"
    # One CARD job, then one extraction per tile (published by the worker right after its commit).
    _run_worker(pg_dsn, bus, 1 + len(tiles), tmp_path)

    status, attempts, written, reason = _one(
        pg_dsn, "SELECT status, attempts, scenes_written, reason FROM card_inputs WHERE id = %s", (input_id,)
    )[0]
    assert (status, attempts, written, reason) == ("done", 1, 2, None)
    scenes = _one(
        pg_dsn,
        "SELECT product_id, card, status, location, acq_key, card_input_id FROM scenes ORDER BY product_id",
    )
    name = safe.name.removesuffix(".SAFE")
    assert [s[0] for s in scenes] == [f"{name}_{t}_BS" for t in tiles]
    assert {s[1:3] for s in scenes} == {("bs", "extracted")} and {s[5] for s in scenes} == {input_id}
    assert [s[4] for s in scenes] == [f"S1B_bs_{t}_20211223T051122" for t in tiles]

    rows = _rows(pg_dsn)
    assert len(rows) == len(PARCELS) * len(tiles) * 2
    for product_id, _card, _status, location, _key, _input in scenes:
        tile = product_id.split("_")[-2]
        item = json.loads(Path(location).read_text())
        assert set(item["assets"]) == {"vv", "vh", "mask", "lia"}
        vv = Path(location).parent / item["assets"]["vv"]["href"]
        with rasterio.open(vv) as ds:
            assert ds.dtypes == ("float32",) and ds.tags()["QUANTITY"] == "beta0"
            assert ds.tags()["NOISE_REMOVED"] == "no" and ds.profile["tiled"]
            transform, shape = ds.transform, ds.shape
            assert str(ds.crs) == mgrs.tile_geobox(tile).crs
        tile_t = mgrs.tile_geobox(tile).transform
        # On the tile's own 10 m lattice: S1 and S2 pixels of a parcel coincide.
        assert transform.a == 10 and transform.e == -10
        assert (transform.c - tile_t.c) % 10 == 0 and (tile_t.f - transform.f) % 10 == 0
        counts = _expected_counts(tile, transform, shape)
        for pid in PARCELS:
            for pol, band in (("VV", "VVb"), ("VH", "VHb")):
                count, mean, std = rows[(pid, product_id, band)]
                assert count == counts[pid], (pid, band, tile)
                assert mean == pytest.approx(truth[pol], rel=1e-6), (pid, band, tile)
                assert std < 1e-6 * truth[pol]


@pytest.mark.timeout(300)
def test_redelivery_and_a_crash_mid_job_leave_one_scene_per_tile_and_no_duplicate_rows(
    grd: tuple[Path, dict[str, float]], cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path
) -> None:
    safe, truth = grd
    _world(pg_dsn, tmp_path)
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    with db.transaction(pg_dsn) as cur:
        input_id, _ = upsert_card_input(cur, _record(str(safe)))
        # A worker claimed the input and died mid-job: its lease has expired, its message is back.
        cur.execute(
            "UPDATE card_inputs SET status = 'processing', lease_owner = 'w-dead', attempts = 1,"
            " lease_until = now() - interval '1 second' WHERE id = %s",
            (input_id,),
        )
        # ... and the same job was published twice (a re-published outbox row).
        enqueue(cur, GenerateCard(card_input_id=input_id, product_id=safe.name[:-5], card="bs", location=str(safe)))
        # An unreadable product is a permanent failure, dead-lettered with the reason on its input.
        bad_id, _ = upsert_card_input(
            cur,
            _record(
                str(tmp_path / "gone.SAFE"), name="S1A_IW_GRDH_1SDV_20211224T051122_20211224T051147_040148_049993_AAAA"
            ),
        )
    assert flush_outbox(pg_dsn, bus) == 3
    # takeover + duplicate + bad + 2 extractions
    _run_worker(pg_dsn, bus, 5, tmp_path)

    assert _one(pg_dsn, "SELECT status, attempts, lease_owner FROM card_inputs WHERE id = %s", (input_id,)) == [
        ("done", 2, None)
    ]
    status, reason = _one(pg_dsn, "SELECT status, reason FROM card_inputs WHERE id = %s", (bad_id,))[0]
    assert status == "failed" and "gone.SAFE" in reason
    scenes = _one(pg_dsn, "SELECT acq_key, count(*) FROM scenes GROUP BY acq_key ORDER BY acq_key")
    assert [c for _k, c in scenes] == [1, 1], "one scene per tile, whatever the deliveries"
    dup = _one(
        pg_dsn,
        "SELECT count(*) FROM (SELECT pid, scene_id, band FROM rome.sigs_2021 GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
    )
    assert dup == [(0,)]
    rows = _rows(pg_dsn)
    assert len(rows) == len(PARCELS) * 2 * 2
    assert all(r[1] == pytest.approx(truth["VV" if k[2] == "VVb" else "VH"], rel=1e-6) for k, r in rows.items())
    depth = busmod.passive_depth
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        assert depth(ch, bus, bus.card_queue)[0] == 0 and depth(ch, bus, bus.queue)[0] == 0
        assert depth(ch, bus, bus.dead_letter_queue)[0] == 1, "only the unreadable product's job"
    finally:
        conn.close()


def test_the_watcher_enqueues_a_grd_once_per_version_and_never_an_slc(pg_dsn: str) -> None:
    def jobs() -> list[tuple[str, str]]:
        return list(_one(pg_dsn, "SELECT message_id, kind FROM outbox ORDER BY id"))

    with db.transaction(pg_dsn) as cur:
        gid, what = upsert_card_input(cur, _record("/data/a.SAFE", checksum="c1"))
    assert what == "new" and jobs() == [(f"card-bs-{gid}", "GenerateCard")]
    with db.transaction(pg_dsn) as cur:
        assert upsert_card_input(cur, _record("/data/a.SAFE", checksum="c1")) == (gid, "same")
        other = _record("/data/b.SAFE", checksum="c1")
        other = dataclasses.replace(other, product_id=other.product_id + "_COG")
        assert upsert_card_input(cur, other) == (gid, "duplicate")
    assert len(jobs()) == 1, "a same or duplicate product enqueues nothing"
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "UPDATE card_inputs SET status = 'processing', lease_owner = 'w1', lease_until = now() + interval '1 h'"
        )
        assert upsert_card_input(cur, _record("/data/a.SAFE", checksum="c2")) == (gid, "changed")
    assert jobs() == [(f"card-bs-{gid}", "GenerateCard")] * 2
    assert _one(pg_dsn, "SELECT status, generation, lease_owner FROM card_inputs WHERE id = %s", (gid,)) == [
        ("awaiting_card", 1, None)
    ], "reset for the new version: a worker still generating the old one cannot commit"
    with db.transaction(pg_dsn) as cur:
        slc = _record(
            "/data/s.SAFE", card="slc", name="S1B_IW_SLC__1SDV_20211223T051122_20211223T051147_030148_039993_BBBB"
        )
        assert upsert_card_input(cur, slc)[1] == "new"
    assert len(jobs()) == 2, "an SLC waits: coherence is not a job yet"


def test_a_card_job_that_killed_its_workers_is_failed_from_its_dead_letter(
    cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str
) -> None:
    """A GenerateCard the broker dead-lettered at its delivery limit (each worker died holding it:
    out of memory on a whole tile, say) fails its input once the last lease expired."""
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url, delivery_limit=1)
    with db.transaction(pg_dsn) as cur:
        input_id, _ = upsert_card_input(cur, _record("/nowhere/a.SAFE"))
    assert flush_outbox(pg_dsn, bus) == 1
    conn = busmod.connect(bus)
    try:
        for _ in range(2):  # two deliveries, each abandoned by a dying consumer (no verdict)
            ch = conn.channel()
            deadline = time.monotonic() + 10
            method = None
            while method is None and time.monotonic() < deadline:
                method, _props, _body = ch.basic_get(bus.card_queue, auto_ack=False)
            assert method is not None
            ch.close()  # unacked: back to the queue, counted as a delivery
        deadline = time.monotonic() + 10
        while busmod.passive_depth(conn.channel(), bus, bus.dead_letter_queue)[0] == 0:
            assert time.monotonic() < deadline, "the broker did not dead-letter the job"
            time.sleep(0.1)
    finally:
        conn.close()
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "UPDATE card_inputs SET status = 'processing', lease_owner = 'w-oom', attempts = 2,"
            " lease_until = now() + interval '1 hour', updated_at = now() - interval '1 minute' WHERE id = %s",
            (input_id,),
        )
    live = reconcile_dead_letters(pg_dsn, bus)
    assert live.failed_inputs == [], "its last worker may still be alive: left alone"
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE card_inputs SET lease_until = now() - interval '1 second' WHERE id = %s", (input_id,))
    report = reconcile_dead_letters(pg_dsn, bus)
    assert report.failed_inputs == [input_id] and report.letters == 1
    assert _one(pg_dsn, "SELECT status, reason FROM card_inputs WHERE id = %s", (input_id,)) == [
        ("failed", "delivery limit reached (worker died 2 times; last worker w-oom)")
    ]

    # After the fix, `jobs retry --dead-lettered` gives the input a new job and removes its letter
    # only once the broker confirmed that job; a second run finds nothing left to do.
    generation = _one(pg_dsn, "SELECT generation FROM card_inputs WHERE id = %s", (input_id,))[0][0]
    again = retry(pg_dsn, bus, dead_lettered=True)
    assert again.cards_republished == [input_id] and again.cards_pending == [] and again.republished == []
    assert again.letters_removed == 1 and again.letters_malformed == 0
    assert _one(
        pg_dsn, "SELECT status, reason, generation, lease_owner FROM card_inputs WHERE id = %s", (input_id,)
    ) == [("queued", None, generation + 1, None)]
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        assert busmod.passive_depth(ch, bus, bus.dead_letter_queue)[0] == 0
        bodies = []
        while (got := ch.basic_get(bus.card_queue, auto_ack=True))[0] is not None:
            bodies.append(json.loads(got[2]))
        assert [(b["kind"], b["card_input_id"], b["card"]) for b in bodies if b["card_input_id"] == input_id] == [
            ("GenerateCard", input_id, "bs")
        ]
    finally:
        conn.close()
    nothing = retry(pg_dsn, bus, dead_lettered=True, failed=True)
    assert nothing.cards_republished == [] and nothing.letters_removed == 0
    # Forced by id: a done input is regenerated, an unknown one is reported, not invented.
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE card_inputs SET status = 'done' WHERE id = %s", (input_id,))
    assert retry(pg_dsn, bus, failed=True, card_inputs=[input_id]).cards_republished == [], "done is not failed"
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "UPDATE card_inputs SET status = 'failed', reason = 'corrupt measurement' WHERE id = %s", (input_id,)
        )
    assert retry(pg_dsn, bus, failed=True).cards_republished == [input_id]
    forced = retry(pg_dsn, bus, card_inputs=[input_id, 987654321])
    assert forced.cards_republished == [input_id] and forced.cards_skipped == {987654321: "unknown card input"}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """An S3 endpoint (moto's server, in a thread) for the GRD and the CARD store, credentials as an
    operator gives them (environment), no profile or config file of the machine."""
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_NO_SIGN_REQUEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cbmflow-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cbmflow-test-secret")
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CBMFLOW_STORE_S3_REGION", "us-east-1")
    monkeypatch.setenv("CBMFLOW_STORE_S3_PATH_STYLE", "true")
    try:
        yield store.s3_client()
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_a_grd_on_s3_is_generated_into_an_s3_card_store(
    grd: tuple[Path, dict[str, float]],
    s3: Any,
    cbm_env: Any,
    pg_dsn: str,
    amqp_url: str,
    management_url: str,
    tmp_path: Path,
) -> None:
    safe, truth = grd
    _world(pg_dsn, tmp_path)
    for bucket in ("eodata", "card"):
        s3.create_bucket(Bucket=bucket)
    prefix = f"Sentinel-1/SAR/IW_GRDH_1S/2021/12/23/{safe.name}"
    for f in safe.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "eodata", f"{prefix}/{f.relative_to(safe)}")
    s3.put_object(Bucket="eodata", Key=f"{prefix}/preview/quick-look.png", Body=b"not needed")
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    with db.transaction(pg_dsn) as cur:
        input_id, _ = upsert_card_input(cur, _record(f"s3://eodata/{prefix}"))
    assert flush_outbox(pg_dsn, bus) == 1
    _run_worker(pg_dsn, bus, 3, tmp_path, card_output_url="s3://card/cbmflow")

    assert _one(pg_dsn, "SELECT status, scenes_written FROM card_inputs WHERE id = %s", (input_id,)) == [("done", 2)]
    assert list((tmp_path / "scratch").iterdir()) == [], "the downloaded GRD and the COGs are removed after the job"
    scenes = _one(pg_dsn, "SELECT product_id, status, location FROM scenes ORDER BY product_id")
    assert {s[1] for s in scenes} == {"extracted"}
    rows = _rows(pg_dsn)
    for product_id, _status, location in scenes:
        assert location.startswith("s3://card/cbmflow/card/bs/") and location.endswith(f"/{product_id}.json")
        item = json.loads(s3.get_object(Bucket="card", Key=location.removeprefix("s3://card/"))["Body"].read())
        tile = product_id.split("_")[-2]
        counts = _expected_counts(
            tile, Affine(*item["properties"]["proj:transform"]), tuple(item["properties"]["proj:shape"])
        )
        for pid in PARCELS:
            for pol, band in (("VV", "VVb"), ("VH", "VHb")):
                count, mean, _std = rows[(pid, product_id, band)]
                assert count == counts[pid] and mean == pytest.approx(truth[pol], rel=1e-6), (pid, band, tile)


def test_grd_inputs_recorded_before_card_jobs_get_their_job_from_the_migration(stack: Any, tmp_path: Path) -> None:
    """A database at sql/012 with GRD inputs waiting (as the watcher left them before CARD jobs
    existed) gets one GenerateCard per live GRD from sql/013, in the contract's shape; SLC and
    deleted inputs get none."""
    from cbmflow.messages import parse_message

    name = f"t_mig_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(stack.pg.dsn_for("postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    dsn = stack.pg.dsn_for(name)
    try:
        before = tmp_path / "sql"
        before.mkdir()
        for f in db.migration_files():
            if f.name < "013":
                (before / f.name).write_text(f.read_text(encoding="utf-8"))
        db.migrate(dsn, before)
        with db.transaction(dsn) as cur:
            for i, (kind, deleted) in enumerate((("grd", False), ("grd", True), ("slc", False))):
                cur.execute(
                    "INSERT INTO card_inputs (acq_key, kind, product_id, product_name, mission, product_type,"
                    " acquired_at, footprint, location, deleted_at) VALUES (%s, %s, %s, %s, 'S1A', 'IW_GRDH', now(),"
                    " ST_Multi(ST_MakeEnvelope(11, 48, 12, 49, 4326)), %s, %s)",
                    (f"k{i}", kind, f"p{i}", f"p{i}", f"/data/p{i}.SAFE", datetime.now(UTC) if deleted else None),
                )
        applied = db.migrate(dsn)
        assert applied[0] == "013_card_jobs.sql"
        with db.transaction(dsn) as cur:
            cur.execute("SELECT message_id, kind, body::text FROM outbox")
            rows = cur.fetchall()
            cur.execute("SELECT id FROM card_inputs WHERE product_id = 'p0'")
            (grd_id,) = cur.fetchone()
        assert [(r[0], r[1]) for r in rows] == [(f"card-bs-{grd_id}", "GenerateCard")]
        msg = parse_message(rows[0][2])
        assert isinstance(msg, GenerateCard) and (msg.card_input_id, msg.card, msg.location) == (
            grd_id,
            "bs",
            "/data/p0.SAFE",
        )
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_a_product_changed_during_its_card_job_is_not_committed_by_the_stale_job(
    grd: tuple[Path, dict[str, float]], pg_dsn: str, tmp_path: Path
) -> None:
    """Guarantee 9 for CARD: the watcher finds the GRD changed while a job generates it; the stale
    job's commit is refused (no scene, the input waits for its new job), however far it got."""
    from worker.cardjob import CardJobs
    from worker.leases import SceneChanged

    safe, _ = grd
    _world(pg_dsn, tmp_path)
    with db.transaction(pg_dsn) as cur:
        input_id, _ = upsert_card_input(cur, _record(str(safe), checksum="v1"))
    settings = WorkerSettings(
        card_quantity="beta0", card_output_url=str(tmp_path / "store"), card_scratch_dir=str(tmp_path / "scratch")
    )
    jobs = CardJobs(pg_dsn, "w-stale", settings)
    conn = db.connect(pg_dsn)
    try:
        msg = GenerateCard(card_input_id=input_id, product_id=safe.name[:-5], card="bs", location=str(safe))
        claimed = jobs.claim(conn, msg)
        assert claimed is not None and claimed.generation == 0
        with db.transaction(pg_dsn) as cur:  # the watcher, meanwhile
            assert upsert_card_input(cur, _record(str(safe), checksum="v2"))[1] == "changed"
        with pytest.raises(SceneChanged):
            jobs.run(conn, claimed)
    finally:
        conn.close()
    assert _one(pg_dsn, "SELECT count(*) FROM scenes") == [(0,)]
    assert _one(pg_dsn, "SELECT status, generation, lease_owner FROM card_inputs WHERE id = %s", (input_id,)) == [
        ("awaiting_card", 1, None)
    ]
    assert _one(pg_dsn, "SELECT count(*) FROM outbox WHERE kind = 'GenerateCard'") == [(2,)], "its new job"
