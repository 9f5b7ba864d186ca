"""Sentinel-1 GRD/SLC items through the watcher against a real STAC API (stac-fastapi-pgstac).

Items shaped like CDSE's ``sentinel-1-grd`` (COG-GRD, ``…_COG`` ids, ``published``) and
earth-search's ``sentinel-1-grd`` (SAFE GRD in ``sentinel-s1-l1c``), tests/data/watch, re-stamped
onto recent acquisitions. They must become CARD inputs waiting for CARD generation: not rejected,
no extraction job, one row per acquisition across the two sources, and a second poll changes
nothing. The expected acquisitions are the ones the test creates.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql
from stac_server import (
    StacServer,
    declare_datetime_queryables,
    pgstac_migrate,
    run_stac_api,
    upsert_collection,
    upsert_items,
)

from catalog_watcher.service import watch_once
from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.settings import BusSettings, SourceSettings, WatchSettings

DATA = Path(__file__).resolve().parents[1] / "data" / "watch"
AOI = {"type": "Polygon", "coordinates": [[[2.5, 45.2], [3.5, 45.2], [3.5, 45.8], [2.5, 45.8], [2.5, 45.2]]]}
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=1)
TEMPLATE = "S1A_IW_GRDH_1SDV_20210809T173953_20210809T174018_039156_049F13_6FF8"


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def s1_name(day: int, ptype: str = "GRDH", uid: str = "6FF8") -> str:
    """A Sentinel-1A IW product name ``day`` days ago, absolute orbit 39156 (relative 59)."""
    start = (NOW - timedelta(days=day)).replace(hour=17, minute=39, second=53)
    stop = start + timedelta(seconds=25)
    return f"S1A_IW_{ptype}_1SDV_{start:%Y%m%dT%H%M%S}_{stop:%Y%m%dT%H%M%S}_039156_049F13_{uid}"


def acq_key(day: int, ptype: str = "GRDH") -> str:
    start = (NOW - timedelta(days=day)).replace(hour=17, minute=39, second=53)
    return f"S1A_IW_{ptype.rstrip('_')}_R059_{start:%Y%m%dT%H%M%S}"


def _restamp(item: dict[str, Any], name: str, day: int) -> dict[str, Any]:
    text = json.dumps(item).replace(TEMPLATE, name).replace(TEMPLATE.lower().replace("_", "-"), name.lower())
    out: dict[str, Any] = json.loads(text)
    when = _iso((NOW - timedelta(days=day)).replace(hour=17, minute=39, second=53))
    for k in ("datetime", "start_datetime", "end_datetime"):
        if k in out["properties"]:
            out["properties"][k] = when
    return out


def cdse_item(day: int, published: datetime, ptype: str = "GRDH", collection: str = "sentinel-1-grd") -> dict[str, Any]:
    item = _restamp(json.loads((DATA / "cdse_s1_grd_item.json").read_text()), s1_name(day, ptype), day)
    item["collection"] = collection
    props = item["properties"]
    props["published"] = props["created"] = _iso(published)
    props["updated"] = _iso(published + timedelta(minutes=3))
    return item


def earthsearch_item(day: int, updated: datetime) -> dict[str, Any]:
    item = _restamp(json.loads((DATA / "earthsearch_s1_grd_item.json").read_text()), s1_name(day), day)
    item["properties"]["updated"] = _iso(updated)
    return item


def _collection(cid: str) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": cid,
        "description": f"test {cid}",
        "license": "other",
        "links": [],
        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
    }


@pytest.fixture(scope="module")
def stac_api(stack: Any, free_ports_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StacServer]:
    name = f"pgstac_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(stack.pg.dsn_for("postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin.close()
    dsn = stack.pg.dsn_for(name)
    pgstac_migrate(dsn)
    declare_datetime_queryables(dsn, ("published", "updated"))
    for cid in ("sentinel-1-grd", "sentinel-1-slc"):
        upsert_collection(dsn, _collection(cid))
    port, proxy_port = free_ports_factory(2)
    pg = stack.pg
    log = tmp_path_factory.mktemp("stac-api") / "server.log"
    with run_stac_api(pg.host, pg.port, pg.db_user, pg.password, name, port, proxy_port, log) as server:
        server.dsn = dsn
        yield server


def _queue_depth(bus: BusSettings, queue: str = "") -> int:
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        q = ch.queue_declare(queue or bus.queue, passive=True)
        return int(q.method.message_count)
    finally:
        conn.close()


def _inputs(pg_dsn: str) -> list[tuple[Any, ...]]:
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "SELECT acq_key, kind, status, product_id, product_name, relative_orbit, location, source, updated_at"
            " FROM card_inputs ORDER BY acq_key"
        )
        return list(cur.fetchall())


def test_s1_grd_and_slc_items_wait_as_card_inputs(
    stac_api: StacServer, cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path
) -> None:
    from cbmflow.parcels.ingest import add_aoi

    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": AOI}))
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "france", path)
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    # CDSE: GRD (COG) of days 2 and 14, an SLC of day 2; earth-search: the SAFE GRD of day 2 (the
    # same acquisition as CDSE's COG) and of day 8 (only earth-search has it).
    upsert_items(
        stac_api.dsn,
        [
            cdse_item(2, T0 + timedelta(minutes=1)),
            cdse_item(14, T0 + timedelta(minutes=2)),
            cdse_item(2, T0 + timedelta(minutes=3), ptype="SLC_", collection="sentinel-1-slc"),
            earthsearch_item(2, T0 + timedelta(minutes=4)),
            earthsearch_item(8, T0 + timedelta(minutes=5)),
        ],
    )
    settings = WatchSettings(
        sources=[
            SourceSettings(
                name="cdse",
                url=stac_api.url,
                collections=["sentinel-1-grd", "sentinel-1-slc"],
                cursor_property="published",
                rate_per_s=50,
            ),
            SourceSettings(
                name="earthsearch",
                url=stac_api.url,
                collections=["sentinel-1-grd"],
                cursor_property="updated",
                rate_per_s=50,
            ),
        ],
        lookback_days=60,
        overlap_s=1800,
        page_size=2,
    )
    first = watch_once(dsn=pg_dsn, bus=bus, settings=settings)
    assert first.rejected == [] and first.errors == []
    assert first.card_inputs.get("new") == 4
    assert first.card_inputs.get("duplicate", 0) >= 1, "the day-2 GRD in its second packaging"
    assert (first.new, first.published, first.pending) == (0, 3, 0), "one GenerateCard(bs) per GRD, none per SLC"
    assert _queue_depth(bus) == 0, "no extraction job for a CARD input"
    assert _queue_depth(bus, bus.card_queue) == 3, "the GRDs' jobs travel on the CARD queue"

    rows = _inputs(pg_dsn)
    assert [r[0] for r in rows] == sorted([acq_key(2), acq_key(14), acq_key(8), acq_key(2, "SLC_")])
    by_key = {r[0]: r for r in rows}
    assert {r[2] for r in rows if r[1] == "grd"} == {"queued"}, "their jobs were confirmed by the broker"
    assert by_key[acq_key(2)][1:3] == ("grd", "queued")
    assert by_key[acq_key(2, "SLC_")][2] == "awaiting_card", "coherence is not a job yet"
    assert by_key[acq_key(2, "SLC_")][1] == "slc"
    # (Both sources read the one test server, so each sees the other's items: identity, not the
    # source, decides; the day-8 product exists only in earth-search's shape.)
    assert by_key[acq_key(8)][3] == s1_name(8)
    assert by_key[acq_key(8)][6].startswith("s3://sentinel-s1-l1c/GRD/")
    # The day-2 GRD is CDSE's COG (first seen); earth-search's SAFE of it added nothing.
    assert by_key[acq_key(2)][3] == s1_name(2) + "_COG" and by_key[acq_key(2)][4] == s1_name(2)
    assert all(r[5] == 59 for r in rows)
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT count(*) FROM scenes")
        scenes = cur.fetchone()
        cur.execute("SELECT message_id, kind, published_at IS NOT NULL FROM outbox ORDER BY message_id")
        outbox = cur.fetchall()
        cur.execute("SELECT 'card-bs-' || id, 'GenerateCard', true FROM card_inputs WHERE kind = 'grd' ORDER BY 1")
        expected_jobs = cur.fetchall()
        cur.execute("SELECT count(*) FROM rejected_items")
        rejected = cur.fetchone()
    assert (scenes, rejected) == ((0,), (0,))
    assert outbox == expected_jobs and len(outbox) == 3

    # A second poll (fresh sources, as after a restart) changes nothing.
    second = watch_once(dsn=pg_dsn, bus=bus, settings=settings)
    assert second.rejected == [] and second.published == 0
    assert set(second.card_inputs) <= {"same", "duplicate"} and second.card_inputs
    assert _inputs(pg_dsn) == rows
    assert _queue_depth(bus) == 0
    assert _queue_depth(bus, bus.card_queue) == 3, "a same or duplicate product enqueues nothing"

    # `cbmflow status` shows them by kind and status, apart from the rejections.
    from cbmflow.ops.status import collect

    shown = collect()
    assert shown["card_inputs"] == {"grd": {"queued": 3}, "slc": {"awaiting_card": 1}}
    assert shown["rejected"]["count"] == 0
