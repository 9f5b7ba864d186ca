"""The watcher against a real STAC API: stac-fastapi-pgstac on the test PostgreSQL, loaded with
pgstac's own functions, holding items shaped like CDSE's and earth-search's (tests/data/watch).

One story over several polls, each a fresh ``watch_once`` with fresh sources (as after a restart):
items published between polls, a late item inside the overlap window, a reprocessed baseline, the
same acquisition in a second collection and a second source, a deleted item, an ``updated``-only
change, a malformed item and a burst of 429 answers on the search POST. The expected acquisitions
are the ones the test itself created, so the assertions do not come from the watcher's output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests
from psycopg2 import sql
from stac_server import (
    StacServer,
    declare_datetime_queryables,
    delete_item,
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
AOI = {"type": "Polygon", "coordinates": [[[11.0, 48.0], [11.5, 48.0], [11.5, 48.5], [11.0, 48.5], [11.0, 48.0]]]}
FOOT = {"type": "Polygon", "coordinates": [[[10.3, 47.7], [11.8, 47.7], [11.8, 48.7], [10.3, 48.7], [10.3, 47.7]]]}
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=1)


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


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


def safe_name(day: int, baseline: str = "0510", tile: str = "32UPU", gen: str = "132211") -> str:
    acq = NOW - timedelta(days=day)
    return f"S2B_MSIL2A_{acq:%Y%m%d}T102021_N{baseline}_R065_T{tile}_{acq:%Y%m%d}T{gen}"


def acq_key(day: int, tile: str = "32UPU") -> str:
    """The acquisition as the test defines it (mission, level, sensing time, orbit, tile)."""
    acq = NOW - timedelta(days=day)
    return f"S2B_MSIL2A_{acq:%Y%m%d}T102021_R065_T{tile}"


def cdse_item(day: int, published: datetime, baseline: str = "0510", updated: datetime | None = None) -> dict[str, Any]:
    """The CDSE-shaped template re-stamped: id = product name, band hrefs under its .SAFE."""
    item: dict[str, Any] = json.loads((DATA / "cdse_s2_l2a_item.json").read_text())
    name = safe_name(day, baseline)
    acq = NOW - timedelta(days=day)
    item["id"] = name
    item["geometry"] = FOOT
    props = item["properties"]
    for k in ("datetime", "start_datetime", "end_datetime"):
        props[k] = _iso(acq.replace(hour=10, minute=20, second=21))
    props["published"] = _iso(published)
    props["created"] = _iso(published - timedelta(minutes=3))
    props["updated"] = _iso(updated or published + timedelta(minutes=3))
    props["processing:version"] = f"{baseline[:2]}.{baseline[2:]}"
    b04 = item["assets"]["B04_10m"]
    b04["href"] = f"s3://eodata/Sentinel-2/MSI/L2A/{acq:%Y/%m/%d}/{name}.SAFE/GRANULE/G/IMG_DATA/R10m/B04_10m.jp2"
    return item


def earthsearch_item(day: int, collection: str, updated: datetime, baseline: str = "0510") -> dict[str, Any]:
    """The recorded earth-search item re-stamped onto our tile and dates (per-band COG assets)."""
    item: dict[str, Any] = json.loads((DATA / "earthsearch_s2_l2a_item.json").read_text())
    acq = NOW - timedelta(days=day)
    item["id"] = (
        f"S2B_32UPU_{acq:%Y%m%d}_0_L2A" if collection == "sentinel-2-l2a" else f"S2B_T32UPU_{acq:%Y%m%d}T102021_L2A"
    )
    item["collection"] = collection
    item["geometry"] = FOOT
    item["bbox"] = [10.3, 47.7, 11.8, 48.7]
    item["links"] = [link for link in item["links"] if link["rel"] in ("license",)]
    props = item["properties"]
    props["datetime"] = _iso(acq.replace(hour=10, minute=31, second=5))
    props["s2:product_uri"] = safe_name(day, baseline) + ".SAFE"
    props["s2:processing_baseline"] = f"{baseline[:2]}.{baseline[2:]}"
    props["grid:code"] = "MGRS-32UPU"
    props["created"] = props["updated"] = _iso(updated)
    for asset in item["assets"].values():
        asset["href"] = asset["href"].replace("22/M/HD/2023/9/S2B_22MHD_20230912_0_L2A", f"32/U/PU/x/{item['id']}")
    return item


def malformed_item(published: datetime) -> dict[str, Any]:
    """Valid STAC (pgstac stores it) but no product: only a thumbnail asset."""
    item = cdse_item(20, published)
    item["id"] = "S2B_MSIL2A_BROKEN_NO_PRODUCT"
    item["assets"] = {"thumbnail": item["assets"]["thumbnail"]}
    return item


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
    for cid in ("sentinel-2-l2a", "sentinel-2-c1-l2a"):
        upsert_collection(dsn, _collection(cid))
    port, proxy_port = free_ports_factory(2)
    pg = stack.pg
    log = tmp_path_factory.mktemp("stac-api") / "server.log"
    with run_stac_api(pg.host, pg.port, pg.db_user, pg.password, name, port, proxy_port, log) as server:
        server.dsn = dsn
        yield server


def _aoi(pg_dsn: str, tmp_path: Path) -> None:
    from cbmflow.parcels.ingest import add_aoi

    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": AOI}))
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "bayern", path)


def _settings(url: str) -> WatchSettings:
    return WatchSettings(
        sources=[
            SourceSettings(
                name="cdse", url=url, collections=["sentinel-2-l2a"], cursor_property="published", rate_per_s=50
            ),
            SourceSettings(
                name="earthsearch", url=url, collections=["sentinel-2-c1-l2a"], cursor_property="updated", rate_per_s=50
            ),
        ],
        lookback_days=60,
        overlap_s=1800,
        page_size=2,  # several pages per poll: paging through `next` links is exercised
        max_retries=5,
        retry_max_wait_s=2,
    )


@pytest.fixture(autouse=True)
def _server_log_on_failure(stac_api: StacServer, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    lines = [ln for ln in stac_api.log_path.read_text(errors="replace").splitlines() if not ln.startswith(" ")]
    print("stac-fastapi-pgstac log (without stack frames):", "\n".join(lines[-40:]))


def _drain(bus: BusSettings) -> list[dict[str, Any]]:
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        out: list[dict[str, Any]] = []
        while True:
            method, props, body = ch.basic_get(bus.queue, auto_ack=True)
            if method is None:
                return out
            out.append(json.loads(body))
    finally:
        conn.close()


def _scenes(pg_dsn: str) -> dict[str, tuple[str, list[str], str]]:
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT acq_key, product_id, superseded_ids, status FROM scenes")
        return {r[0]: (r[1], list(r[2]), r[3]) for r in cur.fetchall()}


def test_incremental_polls_against_a_real_stac_api(
    stac_api: StacServer, cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path
) -> None:
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    _aoi(pg_dsn, tmp_path)
    settings = _settings(stac_api.url)
    stac_api.throttle.requests.clear()
    # (coll 'sentinel-2-l2a' ids of this test are all distinct from other tests: fresh pgstac rows)
    upsert_items(stac_api.dsn, [cdse_item(d, T0 + timedelta(minutes=d)) for d in (1, 2, 3, 4)])
    upsert_items(stac_api.dsn, [malformed_item(T0 + timedelta(minutes=2, seconds=30))])
    # A burst of 429s on the search POST: honoured (Retry-After) and retried, the cycle completes.
    with stac_api.throttle.lock:
        stac_api.throttle.remaining, stac_api.throttle.only_method = 3, "POST"
    first = watch_once(dsn=pg_dsn, bus=bus, settings=settings)
    assert stac_api.throttle.served_429 == 3
    assert first.new == 4 and first.published == 4
    assert [r.split(":")[0] for r in first.rejected] == ["cdse/sentinel-2-l2a/S2B_MSIL2A_BROKEN_NO_PRODUCT"]
    assert set(_scenes(pg_dsn)) == {acq_key(d) for d in (1, 2, 3, 4)}
    sent = _drain(bus)
    assert sorted(m["product_id"] for m in sent) == sorted(safe_name(d) for d in (1, 2, 3, 4))

    # Between polls: a new item, a late one published below the cursor (inside the overlap), a
    # reprocessed baseline of day 2, day 3 again in earth-search's collection (same product: a
    # duplicate), a day-5 acquisition only earth-search has, day 4's `updated` moving alone, and
    # day 1 deleted from the catalogue.
    upsert_items(
        stac_api.dsn,
        [
            cdse_item(6, T0 + timedelta(minutes=30)),
            cdse_item(7, T0 + timedelta(minutes=3, seconds=30)),
            cdse_item(2, T0 + timedelta(minutes=31), baseline="0511"),
            cdse_item(4, T0 + timedelta(minutes=4), updated=T0 + timedelta(minutes=40)),
        ],
    )
    upsert_items(
        stac_api.dsn,
        [
            earthsearch_item(3, "sentinel-2-c1-l2a", T0 + timedelta(minutes=32)),
            earthsearch_item(5, "sentinel-2-c1-l2a", T0 + timedelta(minutes=33)),
        ],
    )

    delete_item(stac_api.dsn, safe_name(1), "sentinel-2-l2a")
    second = watch_once(dsn=pg_dsn, bus=bus, settings=settings)
    scenes = _scenes(pg_dsn)
    assert set(scenes) == {acq_key(d) for d in (1, 2, 3, 4, 5, 6, 7)}, "one scene per acquisition, none missed"
    assert (second.new, second.superseded) == (3, 1)
    assert second.duplicates >= 1
    assert scenes[acq_key(2)][0] == safe_name(2, "0511") and scenes[acq_key(2)][1] == [safe_name(2)]
    assert scenes[acq_key(1)][0] == safe_name(1), "a product gone from the catalogue keeps its scene and rows"
    assert scenes[acq_key(3)][0] == safe_name(3), "the same product in a second collection is not a second scene"
    sent2 = _drain(bus)
    assert sorted(m["product_id"] for m in sent2) == sorted(
        [safe_name(6), safe_name(7), safe_name(2, "0511"), f"S2B_T32UPU_{NOW - timedelta(days=5):%Y%m%d}T102021_L2A"]
    )

    # A restart with nothing new publishes nothing; the malformed item is still only recorded.
    third = watch_once(dsn=pg_dsn, bus=bus, settings=settings)
    assert (third.new, third.superseded, third.changed, third.published) == (0, 0, 0, 0)
    assert _drain(bus) == []
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT item_id, seen_count FROM rejected_items")
        rejected = cur.fetchall()
        cur.execute("SELECT source, published_hwm FROM watch_cursors ORDER BY source")
        cursors = dict(cur.fetchall())
        cur.execute("SELECT count(*), count(DISTINCT body->>'product_id') FROM outbox")
        total, distinct = cur.fetchone() or (0, 0)
    assert [r[0] for r in rejected] == ["S2B_MSIL2A_BROKEN_NO_PRODUCT"] and rejected[0][1] >= 2
    assert cursors["cdse"] == T0 + timedelta(minutes=31)
    assert cursors["earthsearch"] == T0 + timedelta(minutes=33)
    assert total == distinct == 8, "every product published exactly once across the restarts"
    # `cbmflow status` shows them: how many, and the latest with the reason.
    from cbmflow.ops.status import collect

    shown = collect()["rejected"]
    assert shown["count"] == 1
    assert shown["latest"][0]["item_id"] == "S2B_MSIL2A_BROKEN_NO_PRODUCT"
    assert "no product asset" in shown["latest"][0]["reason"]
    # Once a cursor exists, searches filter on the cursor property (CQL2) instead of rescanning.
    posts = [json.loads(r.split(" ", 2)[2]) for r in stac_api.throttle.requests if r.startswith("POST /search")]
    filtered = {p["filter"]["args"][0]["property"] for p in posts if "filter" in p}
    assert filtered == {"published", "updated"}
    assert all(p["sortby"][0]["field"] in ("properties.published", "properties.updated") for p in posts)


def test_sigterm_stops_the_daemon_between_requests_with_metrics(
    stac_api: StacServer, cbm_env: Any, pg_dsn: str, tmp_path: Path, free_ports_factory: Any
) -> None:
    _aoi(pg_dsn, tmp_path)
    (metrics_port,) = free_ports_factory(1)
    sources = [{"name": "cdse", "url": stac_api.url, "collections": ["sentinel-2-l2a"], "rate_per_s": 50}]
    env = dict(
        os.environ,
        CBMFLOW_DB_DSN=pg_dsn,
        CBMFLOW_WATCH_SOURCES=json.dumps(sources),
        CBMFLOW_WATCH_METRICS_PORT=str(metrics_port),
        CBMFLOW_WATCH_PAGE_SIZE="2",
    )
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "cbmflow"), "watch", "--interval", "0.5"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline:
            try:
                body = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).text
                if 'cbmflow_watch_polls_total{result="ok"} 2.0' in body:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        assert 'cbmflow_watch_polls_total{result="ok"} 2.0' in body, body[-2000:]
        assert 'cbmflow_watch_requests_total{source="cdse"}' in body
        assert "cbmflow_watch_cursor_lag_seconds" in body
        # Hold the next search in a 30 s Retry-After: SIGTERM must end the wait, not sit it out.
        with stac_api.throttle.lock:
            stac_api.throttle.remaining, stac_api.throttle.only_method = 1000, "POST"
            stac_api.throttle.retry_after_s, before = 30.0, stac_api.throttle.served_429
        while stac_api.throttle.served_429 == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stac_api.throttle.served_429 > before
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-3000:]
        assert time.monotonic() - stopped_at < 10, "the stop waited out the Retry-After"
        assert b"watch.stopped" in out
        assert out.count(b'"event": "watch.cycle"') >= 2, "one summary line per cycle"
    finally:
        with stac_api.throttle.lock:
            stac_api.throttle.remaining, stac_api.throttle.retry_after_s = 0, 0.2
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _deleted_at(pg_dsn: str, days: tuple[int, ...]) -> dict[int, datetime | None]:
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT acq_key, deleted_at FROM scenes WHERE acq_key = ANY(%s)", ([acq_key(d) for d in days],))
        got = dict(cur.fetchall())
    assert set(got) == {acq_key(d) for d in days}, "every scene row is kept"
    return {d: got[acq_key(d)] for d in days}


def test_items_deleted_from_a_stac_api_are_marked_only_after_a_complete_listing(
    stac_api: StacServer, cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path
) -> None:
    """A STAC API has no deletion feed: an item the listing of the window no longer returns is
    marked deleted (row kept), and only a listing that ran to its last page may conclude that."""
    from catalog_watcher.service import ScanFailed

    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    _aoi(pg_dsn, tmp_path)
    days = (20, 21, 22, 23, 24)  # acquisitions no other test of this module uses
    upsert_items(stac_api.dsn, [cdse_item(d, T0 + timedelta(minutes=50 + d)) for d in days])
    base = _settings(stac_api.url)
    sweep_every_cycle = base.model_copy(update={"sources": [base.sources[0]], "deleted_sweep_s": 0.0})
    first = watch_once(dsn=pg_dsn, bus=bus, settings=sweep_every_cycle)
    assert first.deleted == 0 and first.new >= len(days)
    assert all(v is None for v in _deleted_at(pg_dsn, days).values())
    _drain(bus)

    delete_item(stac_api.dsn, safe_name(21), "sentinel-2-l2a")
    delete_item(stac_api.dsn, safe_name(23), "sentinel-2-l2a")
    # The poll alone (no listing) costs n requests; a budget of n + 2 lets the poll finish and cuts
    # the listing after its landing-page request, at its first search page: nothing may be
    # concluded from that.
    no_sweep = sweep_every_cycle.model_copy(update={"deleted_sweep_s": -1.0})
    n = watch_once(dsn=pg_dsn, bus=bus, settings=no_sweep).requests["cdse"]
    assert all(v is None for v in _deleted_at(pg_dsn, days).values()), "no listing, no conclusion"
    src = sweep_every_cycle.sources[0].model_copy(update={"request_budget": n + 2})
    with pytest.raises(ScanFailed, match="request budget") as cut:
        watch_once(dsn=pg_dsn, bus=bus, settings=sweep_every_cycle.model_copy(update={"sources": [src]}))
    assert cut.value.report.deleted == 0 and cut.value.report.requests["cdse"] == n + 2
    assert all(v is None for v in _deleted_at(pg_dsn, days).values()), "a listing cut short marks nothing"

    complete = watch_once(dsn=pg_dsn, bus=bus, settings=sweep_every_cycle)
    marks = _deleted_at(pg_dsn, days)
    assert complete.deleted == 2
    assert {d for d, v in marks.items() if v is not None} == {21, 23}
    assert _drain(bus) == [], "a deletion publishes no job"
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT items FROM watch_listings WHERE source = 'cdse' AND collection = 'sentinel-2-l2a'")
        (listed,) = cur.fetchone() or (0,)
    assert listed >= len(days) - 2
    # The default interval: the next cycle does not list again, and a mark stays.
    again = watch_once(dsn=pg_dsn, bus=bus, settings=base.model_copy(update={"sources": [base.sources[0]]}))
    assert again.deleted == 0 and _deleted_at(pg_dsn, days) == marks
