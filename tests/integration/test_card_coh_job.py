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

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import shapely
import shapely.geometry

from catalog_watcher.service import upsert_card_input
from catalog_watcher.stac import SceneRecord
from cbmflow import db
from cbmflow.messages import GenerateCard, parse_message

PAIR = Path("../shared/data/sentinel1/coh-pair")
EARLY = PAIR / "S1A_IW_SLC__1SDV_20250406T022008_20250406T022035_058630_07421F_93A7.SAFE"
LATE = PAIR / "S1A_IW_SLC__1SDV_20250418T022008_20250418T022035_058805_074946_C7D4.SAFE"
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
    # 6-day one (the pair made stands), then others that are no pair at all.
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
        "the 6-day one is paired with the 12-days-3-hours one (6 days within the tolerance); the pair made stands"
    )
    assert pair_of(late) == (e12, 12) and pair_of(e6) == (e12, 6)
    # A re-scan changes nothing; a changed product re-pairs and, its job still pending, writes none.
    with db.transaction(pg_dsn) as cur:
        assert upsert_card_input(cur, _record(_name(t0, "L000"), t0)) == (late, "same")
        assert upsert_card_input(cur, _record(_name(t0, "L000"), t0, checksum="v2")) == (late, "changed")
    assert len(coh_jobs()) == 2, "the pending job runs the current pair (the worker reads it from the row)"
    assert pair_of(late) == (e6, 6), "re-paired: the 6-day predecessor exists now"
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
