"""``GenerateCard(coh)`` on real servers: two SLC card inputs 12 days apart on one relative orbit →
the watcher pairs them and writes one job → a worker makes coherence COGs on the MGRS tiles under
the AOI → one ``c12`` scene per tile → its extraction → ``VVc``/``VHc`` rows.

The pair is the real geometry of ``../shared/data/sentinel1/coh-pair`` (S1A IW2, 2025-04-06 and
2025-04-18: orbits, burst lists, FM-rate and Doppler polynomials) with synthetic complex pixels
from :mod:`card.s1slc.synthetic`, the generator ``tests/unit/test_card_coh.py`` validates the
processor with: a common scatterer field seen by both dates, a_late = γ·a_early + √(1−γ²)·n. The
truth the parcel means are held against is the estimator's expected value for that γ
(:func:`card.s1slc.coh.expected_coherence`, Touzi et al.) at the window's number of looks, not
the processor's output. The watcher's pairing rules (6 before 12 days, a late arrival, a re-scan,
a changed product) are checked on the same database without a worker.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.errors
import shapely
import shapely.geometry
from pyproj import Transformer
from slc_pairs import EARLY, LATE, require_pair, scatterer_window, write_safe

from catalog_watcher.service import upsert_card_input
from catalog_watcher.stac import SceneRecord
from cbmflow import db
from cbmflow.messages import GenerateCard, parse_message
from cbmflow.outbox import enqueue, flush_outbox
from cbmflow.settings import BusSettings, WorkerSettings

ORBIT = 35
FRAME = shapely.geometry.box(-128.6, 52.6, -126.0, 54.4)  # an IW frame's extent, for the pairing checks


def _record(
    name: str,
    acquired: datetime,
    *,
    location: str = "",
    orbit: int | None = ORBIT,
    checksum: str = "v1",
    footprint: Any = None,
) -> SceneRecord:
    return SceneRecord(
        product_id=name,
        product_name=name,
        mission=name[:3],
        sensor="IW_SLC__1S",
        card="slc",
        acquired_at=acquired,
        footprint=footprint if footprint is not None else FRAME,
        location=location or f"/data/{name}.SAFE",
        updated=acquired.isoformat(),
        acq_key=f"{name[:3]}_IW_SLC_R{orbit or 0:03d}_{acquired:%Y%m%dT%H%M%S}",
        checksum=checksum,
        relative_orbit=orbit,
    )


def _name(when: datetime, tag: str) -> str:
    return f"S1A_IW_SLC__1SDV_{when:%Y%m%dT%H%M%S}_{when + timedelta(seconds=27):%Y%m%dT%H%M%S}_058630_07421F_{tag}"


def _one(dsn: str, query: str, args: tuple[Any, ...] = ()) -> Any:
    with db.transaction(dsn) as cur:
        cur.execute(query, args)
        return cur.fetchall()


def test_the_watcher_pairs_slcs_by_orbit_and_gap_once(pg_dsn: str) -> None:
    t0 = datetime(2025, 4, 30, 2, 20, 8, tzinfo=UTC)

    def coh_jobs() -> list[GenerateCard]:
        rows = _one(pg_dsn, "SELECT body::text FROM outbox WHERE kind = 'GenerateCard' ORDER BY id")
        msgs = [parse_message(r[0]) for r in rows]
        out = [m for m in msgs if isinstance(m, GenerateCard) and m.card == "coh"]
        assert len(out) == len(msgs)
        return out

    def pair_of(input_id: int) -> tuple[int | None, int | None]:
        row = _one(pg_dsn, "SELECT partner_input_id, gap_days FROM card_inputs WHERE id = %s", (input_id,))[0]
        return row[0], row[1]

    with db.transaction(pg_dsn) as cur:
        late, what = upsert_card_input(cur, _record(_name(t0, "L000"), t0))
        assert what == "new"
    assert coh_jobs() == [] and pair_of(late) == (None, None), "no predecessor yet: it waits without a job"

    # Late arrivals: the 12-day predecessor first (the successor gets its job with it), then the
    # 6-day one (the successor is paired again with it), then others that are no pair at all.
    with db.transaction(pg_dsn) as cur:
        d12 = t0 - timedelta(days=12, hours=3)
        e12, _ = upsert_card_input(cur, _record(_name(d12, "E012"), d12, location="/data/e12.SAFE"))
    (job,) = coh_jobs()
    assert (job.card_input_id, job.partner_input_id, job.partner_location) == (late, e12, "/data/e12.SAFE")
    assert job.message_id == f"card-coh-{late}" and pair_of(late) == (e12, 12)
    with db.transaction(pg_dsn) as cur:
        d6 = t0 - timedelta(days=6)
        e6, _ = upsert_card_input(cur, _record(_name(d6, "E006"), d6))
        other_orbit = t0 - timedelta(days=6, seconds=600)
        upsert_card_input(cur, _record(_name(other_orbit, "O137"), other_orbit, orbit=137))
        away = t0 - timedelta(days=6, seconds=1200)
        far = shapely.geometry.box(-100.0, 40.0, -98.0, 42.0)
        upsert_card_input(cur, _record(_name(away, "AWAY"), away, footprint=far))
    jobs = coh_jobs()
    assert [(j.card_input_id, j.partner_input_id) for j in jobs] == [(late, e12), (e6, e12)], (
        "the 6-day one is paired with the 12-days-3-hours one (6 days within the tolerance); the successor's"
        " job is still pending, so no second one is written: the worker reads the pair from the row"
    )
    assert pair_of(late) == (e6, 6) and pair_of(e6) == (e12, 6), "6 days is the shorter gap: paired again"
    # A re-scan changes nothing; a changed product re-pairs and, its job still pending, writes none.
    with db.transaction(pg_dsn) as cur:
        assert upsert_card_input(cur, _record(_name(t0, "L000"), t0)) == (late, "same")
        assert upsert_card_input(cur, _record(_name(t0, "L000"), t0, checksum="v2")) == (late, "changed")
    assert len(coh_jobs()) == 2, "the pending job runs the current pair (the worker reads it from the row)"
    assert pair_of(late) == (e6, 6), "re-paired with the same best predecessor"
    # Published, then the predecessor changes: its successor is reset and gets its job again.
    _one(pg_dsn, "UPDATE outbox SET published_at = now() RETURNING id")
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE card_inputs SET status = 'done', generation = 3 WHERE id = %s", (late,))
        assert upsert_card_input(cur, _record(_name(d6, "E006"), d6, checksum="v2")) == (e6, "changed")
    jobs = coh_jobs()
    assert [(j.card_input_id, j.partner_input_id) for j in jobs[2:]] == [(e6, e12), (late, e6)]
    assert _one(pg_dsn, "SELECT status, generation FROM card_inputs WHERE id = %s", (late,)) == [("awaiting_card", 4)]
    # A new SLC 6 days after the latest: its own job, with the latest as its partner.
    with db.transaction(pg_dsn) as cur:
        nxt, _ = upsert_card_input(cur, _record(_name(t0 + timedelta(days=6), "N006"), t0 + timedelta(days=6)))
    jobs = coh_jobs()
    assert len(jobs) == 5 and (jobs[-1].card_input_id, jobs[-1].partner_input_id) == (nxt, late)
    assert pair_of(nxt) == (late, 6)


def test_a_6_day_predecessor_arriving_after_a_12_day_pair_was_made_pairs_it_again(pg_dsn: str) -> None:
    """The c12 product made stays; the successor gets a new generation and a job for its c6 pair.
    A predecessor giving no shorter gap (another 12-day one) leaves a finished pair alone."""
    t0 = datetime(2025, 6, 11, 5, 40, 2, tzinfo=UTC)
    with db.transaction(pg_dsn) as cur:
        e12, _ = upsert_card_input(cur, _record(_name(t0 - timedelta(days=12), "P012"), t0 - timedelta(days=12)))
        late, _ = upsert_card_input(cur, _record(_name(t0, "P000"), t0))
    # its 12-day job published and done
    _one(pg_dsn, "UPDATE outbox SET published_at = now() WHERE published_at IS NULL RETURNING id")
    _one(pg_dsn, "UPDATE card_inputs SET status = 'done', generation = 2 WHERE id = %s RETURNING id", (late,))
    with db.transaction(pg_dsn) as cur:
        twin = t0 - timedelta(days=12, seconds=-40)  # the same 12-day gap: nothing to gain
        upsert_card_input(cur, _record(_name(twin, "T012"), twin))
    assert _one(pg_dsn, "SELECT status, generation, partner_input_id FROM card_inputs WHERE id = %s", (late,)) == [
        ("done", 2, e12)
    ]
    with db.transaction(pg_dsn) as cur:
        e6, _ = upsert_card_input(cur, _record(_name(t0 - timedelta(days=6), "P006"), t0 - timedelta(days=6)))
    assert _one(
        pg_dsn, "SELECT status, generation, partner_input_id, gap_days FROM card_inputs WHERE id = %s", (late,)
    ) == [("awaiting_card", 3, e6, 6)]
    pending = [parse_message(r[0]) for r in _one(pg_dsn, "SELECT body::text FROM outbox WHERE published_at IS NULL")]
    assert sorted((m.card_input_id, m.partner_input_id) for m in pending if isinstance(m, GenerateCard)) == sorted(
        [(e6, e12), (late, e6)]
    ), "the new one's own 6-day pair, and the successor's"


# --- the job ----------------------------------------------------------------------------------------

YEAR = 2025
GAMMA = {"VV": 0.7, "VH": 0.3}
"""The synthetic coherence per polarisation (different, so a swapped band shows)."""
LOOKS = 27.0
"""Effective looks of the 7 x 7 window at 10 m on this geometry: the equivalent number of looks of
one date's window-mean intensity that tests/unit/test_card_coh.py measures (26.9; docs/card-coh.md)."""
BASELINE_COH = 0.995
"""The pair's baseline and burst-timing decorrelation predicted from the orbits (0.9952, same test)."""
AOI_HALF_M = 400.0
PARCEL_M = 340.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both dates as small synthetic SAFEs over an 800 m AOI mid-swath in burst 3 (tile 09UWT), with
    four parcels; the field extends 250 m beyond the AOI, past the job's grid and window."""
    require_pair()
    from affine import Affine

    from card.geobox import GeoBox
    from card.s1slc import synthetic as syn
    from card.s1slc.safe import open_slc

    early, late = open_slc(EARLY, ("VV",), ("IW2",)), open_slc(LATE, ("VV",), ("IW2",))
    se, sl = early.swaths[("IW2", "VV")], late.swaths[("IW2", "VV")]
    g = se.grid
    on_line = g.line == 4539.0  # a geolocation grid line inside burst 3, mid-swath at sample 13 000
    order = np.argsort(g.pixel[on_line])
    lon = float(np.interp(13000, g.pixel[on_line][order], g.lon[on_line][order]))
    lat = float(np.interp(13000, g.pixel[on_line][order], g.lat[on_line][order]))
    crs = "EPSG:32609"
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    x, y = round(x / 10) * 10, round(y / 10) * 10
    field_half = AOI_HALF_M + 250
    n = int(2 * field_half / 10)
    field = GeoBox((n, n), Affine(10.0, 0.0, x - field_half, 0.0, -10.0, y + field_half), crs)
    rng = np.random.default_rng(13)
    common, other = syn.scatterers(field, 5.0, rng), syn.scatterers(field, 5.0, rng)
    a, noise = syn.complex_gaussian(len(common.x), rng), syn.complex_gaussian(len(other.x), rng)
    we, wl = scatterer_window(se, common.points), scatterer_window(sl, np.concatenate([common.points, other.points]))
    e_a = syn.simulate(se, common.points, a, *we)
    l_a, l_n = syn.simulate(sl, common.points, a, *wl), syn.simulate(sl, other.points, noise, *wl)
    late_pol = {
        pol: syn.SyntheticSwath(
            sl, l_a.row0, l_a.col0, (g_ * l_a.data + np.sqrt(1 - g_ * g_) * l_n.data).astype(np.complex64)
        )
        for pol, g_ in GAMMA.items()
    }
    root = tmp_path_factory.mktemp("coh")
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform
    aoi = shapely.transform(
        shapely.geometry.box(x - AOI_HALF_M, y - AOI_HALF_M, x + AOI_HALF_M, y + AOI_HALF_M),
        to_lonlat,
        interleaved=False,
    )
    size = PARCEL_M  # four parcels, one per quarter of the AOI, 30 m from the centre lines
    parcels = {
        f"p{i}": shapely.geometry.box(x0, y0, x0 + size, y0 + size)
        for i, (x0, y0) in enumerate(
            (x - 30 - size if dx < 0 else x + 30, y - 30 - size if dy < 0 else y + 30)
            for dx, dy in ((-1, -1), (-1, 1), (1, -1), (1, 1))
        )
    }
    # VV and VH share the geometry and the field; only the late date's γ differs per polarisation.
    return {
        "early": write_safe(EARLY, root / "early", {"VV": e_a, "VH": e_a}),
        "late": write_safe(LATE, root / "late", late_pol),
        "footprints": (early.footprint_lonlat(), late.footprint_lonlat()),
        "aoi": aoi,
        "parcels": parcels,
        "crs": crs,
        "root": root,
    }


def _world(dsn: str, pair: dict[str, Any], tmp: Path) -> None:
    from cbmflow.parcels.ingest import add_aoi, import_parcels

    (tmp / "aoi.geojson").write_text(
        json.dumps({"type": "Feature", "properties": {}, "geometry": pair["aoi"].__geo_interface__})
    )
    to_lonlat = Transformer.from_crs(pair["crs"], "EPSG:4326", always_xy=True).transform
    features = [
        {
            "type": "Feature",
            "properties": {"parcel_id": pid},
            "geometry": shapely.transform(
                shapely.segmentize(poly, 10.0), to_lonlat, interleaved=False
            ).__geo_interface__,
        }
        for pid, poly in pair["parcels"].items()
    ]
    (tmp / "parcels.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with db.transaction(dsn) as cur:
        add_aoi(cur, "bc", tmp / "aoi.geojson")
        import_parcels(cur, tmp / "parcels.geojson", "bc", YEAR, id_column="parcel_id", srid=32609)


def _slc_record(safe: Path, footprint: list[tuple[float, float]]) -> SceneRecord:
    name = safe.name.removesuffix(".SAFE")
    when = datetime.strptime(name.split("_")[5], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return dataclasses.replace(
        _record(name, when, location=str(safe)), footprint=shapely.geometry.Polygon(footprint), relative_orbit=108
    )


def _run_worker(dsn: str, bus: BusSettings, jobs: int, tmp: Path) -> None:
    from worker.consumer import Worker

    settings = WorkerSettings(
        heartbeat_s=0.5,
        metrics_port=-1,
        idle_exit_s=40,
        card_margin_m=50.0,
        card_threads=1,
        card_output_url=str(tmp / "store"),
        card_scratch_dir=str(tmp / "scratch"),
    )
    worker = Worker(dsn=dsn, bus=bus, settings=settings, max_jobs=jobs)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    t.start()
    t.join(150)
    assert not t.is_alive(), "worker did not finish its jobs in time"
    assert rc == [0] and worker.done == jobs


@pytest.mark.timeout(300)
def test_a_12_day_pair_becomes_c12_scenes_whose_parcel_means_are_the_coherence(
    pair: dict[str, Any], cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path
) -> None:
    from card import mgrs
    from card.s1slc.coh import expected_coherence

    _world(pg_dsn, pair, tmp_path)
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    foot_e, foot_l = pair["footprints"]
    with db.transaction(pg_dsn) as cur:
        early_id, _ = upsert_card_input(cur, _slc_record(pair["early"], foot_e))
        late_id, what = upsert_card_input(cur, _slc_record(pair["late"], foot_l))
    assert what == "new"
    jobs = _one(pg_dsn, "SELECT message_id, body::text FROM outbox")
    assert [j[0] for j in jobs] == [f"card-coh-{late_id}"], "one GenerateCard(coh), for the later date"
    msg = parse_message(jobs[0][1])
    assert isinstance(msg, GenerateCard) and (msg.partner_input_id, msg.partner_location) == (
        early_id,
        str(pair["early"]),
    )
    assert flush_outbox(pg_dsn, bus) == 1
    assert mgrs.tiles_intersecting(pair["aoi"]) == ["09UWT"]
    _run_worker(pg_dsn, bus, 2, tmp_path)  # the CARD job, then the tile's extraction

    status, written, reason, gap = _one(
        pg_dsn, "SELECT status, scenes_written, reason, gap_days FROM card_inputs WHERE id = %s", (late_id,)
    )[0]
    assert (status, written, reason, gap) == ("done", 1, None, 12)
    assert _one(pg_dsn, "SELECT status FROM card_inputs WHERE id = %s", (early_id,)) == [("awaiting_card",)]
    scenes = _one(pg_dsn, "SELECT id, product_id, card, status, acq_key, location, acquired_at FROM scenes")
    (scene_id, product_id, card, sstatus, acq_key, location, acquired) = scenes[0]
    assert len(scenes) == 1 and (card, sstatus) == ("c12", "extracted")
    assert product_id == f"{LATE.name.removesuffix('.SAFE')}_09UWT_COH12"
    assert acq_key == "S1A_c12_09UWT_20250418T022008" and acquired == datetime(2025, 4, 18, 2, 20, 8, tzinfo=UTC)
    item = json.loads(Path(location).read_text())
    assert set(item["assets"]) == {"vv", "vh"} and item["properties"]["cbmflow:gap_days"] == 12
    with rasterio.open(Path(location).parent / item["assets"]["vv"]["href"]) as ds:
        assert ds.tags()["GAP_DAYS"] == "12" and ds.tags()["DATE_EARLY"].startswith("2025-04-06")
        assert ds.crs.to_epsg() == 32609 and ds.transform.a == 10
        assert (ds.transform.c - mgrs.tile_geobox("09UWT").transform.c) % 10 == 0

    rows = _one(
        pg_dsn,
        "SELECT p.parcel_id, g.band, g.count, g.mean FROM bc.sigs_2025 g JOIN bc.parcels_2025 p USING (pid)"
        " WHERE g.scene_id = %s",
        (scene_id,),
    )
    assert {(r[0], r[1]) for r in rows} == {(pid, b) for pid in pair["parcels"] for b in ("VVc", "VHc")}
    for pol, band in (("VV", "VVc"), ("VH", "VHc")):
        mine = [r for r in rows if r[1] == band]
        counts = np.array([r[2] for r in mine], float)
        assert counts.min() > 0.9 * (PARCEL_M / 10) ** 2, "every parcel pixel has a coherence (no edge NaN)"
        mean = float(np.sum(counts * np.array([r[3] for r in mine])) / counts.sum())
        truth = expected_coherence(GAMMA[pol] * BASELINE_COH, LOOKS)
        assert mean == pytest.approx(truth, abs=0.03), (pol, mean, truth)

    # The same job delivered again: acknowledged as a duplicate, nothing added or replaced.
    before = _one(pg_dsn, "SELECT count(*), sum(mean) FROM bc.sigs_2025")
    with db.transaction(pg_dsn) as cur:
        enqueue(cur, msg)
    assert flush_outbox(pg_dsn, bus) == 1
    _run_worker(pg_dsn, bus, 1, tmp_path)
    assert _one(pg_dsn, "SELECT count(*), sum(mean) FROM bc.sigs_2025") == before
    assert _one(pg_dsn, "SELECT count(*) FROM scenes") == [(1,)]
    assert _one(pg_dsn, "SELECT attempts, status FROM card_inputs WHERE id = %s", (late_id,)) == [(1, "done")]


def test_a_coh_job_without_a_pair_or_for_the_wrong_kind_is_permanent(pg_dsn: str, tmp_path: Path) -> None:
    """An SLC whose pair is gone (a stale or hand-written job) cannot make coherence, and a bs job
    for an SLC is refused: both permanent, neither leaves a scene."""
    from cbmflow.errors import PermanentJobError
    from worker.cardjob import UnsupportedCardJob
    from worker.cardjob_coh import CardJobsWithCoh

    t0 = datetime(2025, 4, 30, 2, 20, 8, tzinfo=UTC)
    with db.transaction(pg_dsn) as cur:
        alone, _ = upsert_card_input(cur, _record(_name(t0, "A000"), t0))
    jobs = CardJobsWithCoh(pg_dsn, "w-test", WorkerSettings(card_scratch_dir=str(tmp_path)))
    conn = db.connect(pg_dsn)
    try:
        msg = GenerateCard(card_input_id=alone, product_id="p", card="coh", location="/data/x.SAFE")
        claimed = jobs.claim(conn, msg)
        assert claimed is not None and claimed.kind == "slc"
        with pytest.raises(PermanentJobError, match="no \\(live\\) earlier acquisition"):
            jobs.run(conn, claimed)
        with pytest.raises(UnsupportedCardJob, match="needs a grd"):
            jobs.claim(conn, msg.model_copy(update={"card": "bs"}))
    finally:
        conn.close()
    assert _one(pg_dsn, "SELECT count(*) FROM scenes") == [(0,)]


def test_jobs_retry_republishes_a_failed_coherence_job_with_its_pair(
    cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str
) -> None:
    """`cbmflow jobs retry --failed` after a fix: a paired SLC gets its coh job again, with the
    partner recorded on its row; an SLC without a partner is reported, not given a job."""
    from cbmflow import bus as busmod
    from cbmflow.ops.jobs import retry

    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    t0 = datetime(2025, 5, 30, 2, 20, 8, tzinfo=UTC)
    early_at = t0 - timedelta(days=12)
    with db.transaction(pg_dsn) as cur:
        early, _ = upsert_card_input(cur, _record(_name(early_at, "R012"), early_at, location="/data/r12.SAFE"))
        late, _ = upsert_card_input(cur, _record(_name(t0, "R000"), t0, location="/data/r0.SAFE"))
        alone, _ = upsert_card_input(cur, _record(_name(t0, "R137"), t0, orbit=137))
    assert flush_outbox(pg_dsn, bus) >= 1
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE card_inputs SET status = 'failed', reason = 'x' WHERE id = ANY(%s)", ([late, alone],))
    report = retry(pg_dsn, bus, failed=True)
    assert report.cards_republished == [late] and report.cards_pending == []
    assert report.cards_skipped == {alone: "an SLC without a coherence partner (6 or 12 days earlier) yet"}
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        msgs = []
        while (got := ch.basic_get(bus.card_queue, auto_ack=True))[0] is not None:
            msgs.append(parse_message(got[2]))
    finally:
        conn.close()
    again = [m for m in msgs if isinstance(m, GenerateCard) and m.card_input_id == late]
    assert len(again) == 2, "the watcher's job and the retry's"
    assert {(m.card, m.partner_input_id, m.partner_location) for m in again} == {("coh", early, "/data/r12.SAFE")}
    assert _one(pg_dsn, "SELECT status FROM card_inputs WHERE id = %s", (late,)) == [("queued",)]
