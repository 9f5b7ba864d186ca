"""The CDSE OData source against a local HTTP server replaying product pages.

The server holds products shaped like a recorded CDSE OData response (tests/data/watch) and
answers ``…/Products`` the way CDSE documents it: ``$filter`` clauses joined with ``and`` (it
evaluates the ``PublicationDate ge`` and ``ContentDate/Start ge`` bounds, and checks the collection
and product-type clauses are present), ``$orderby=PublicationDate asc`` with ``Id`` as tie-break,
``$top``, and 422 for a ``$skip`` beyond 10 000. Two products share a publication time across a
page boundary, one is offline, one is malformed, one is a reprocessed baseline, and the first
requests are answered 429 with ``Retry-After``.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from catalog_watcher.service import watch_once
from cbmflow import db
from cbmflow.settings import BusSettings, SourceSettings, WatchSettings

DATA = Path(__file__).resolve().parents[1] / "data" / "watch"
AOI = {"type": "Polygon", "coordinates": [[[11.0, 48.0], [11.5, 48.0], [11.5, 48.5], [11.0, 48.5], [11.0, 48.0]]]}
FOOT = {"type": "Polygon", "coordinates": [[[10.3, 47.7], [11.8, 47.7], [11.8, 48.7], [10.3, 48.7], [10.3, 47.7]]]}
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=1)


def _odata_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse(t: str) -> datetime:
    return datetime.fromisoformat(t.replace("Z", "+00:00"))


def name_of(day: int, baseline: str = "0510") -> str:
    acq = NOW - timedelta(days=day)
    return f"S2B_MSIL2A_{acq:%Y%m%d}T102021_N{baseline}_R065_T32UPU_{acq:%Y%m%d}T132211"


def product(day: int, published: datetime, baseline: str = "0510", online: bool = True) -> dict[str, Any]:
    p: dict[str, Any] = json.loads((DATA / "odata_product.json").read_text())
    name = name_of(day, baseline)
    acq = NOW - timedelta(days=day)
    p["Id"] = str(uuid.uuid4())
    p["Name"] = name + ".SAFE"
    p["PublicationDate"] = p["ModificationDate"] = p["OriginDate"] = _odata_time(published)
    p["Online"] = online
    p["S3Path"] = f"/eodata/Sentinel-2/MSI/L2A/{acq:%Y/%m/%d}/{name}.SAFE"
    p["ContentDate"] = {"Start": _odata_time(acq.replace(hour=10, minute=20, second=21)), "End": _odata_time(acq)}
    p["GeoFootprint"] = FOOT
    p["Checksum"][0]["Value"] = uuid.uuid4().hex
    return p


@dataclass
class Catalogue:
    products: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, list[str]]] = field(default_factory=list)
    throttle: int = 0
    served_429: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(cat: Catalogue) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            url = urlparse(self.path)
            q = parse_qs(url.query)
            with cat.lock:
                cat.requests.append(q)
                if cat.throttle > 0:
                    cat.throttle -= 1
                    cat.served_429 += 1
                    self._send(429, {"detail": "Too Many Requests"}, {"Retry-After": "0.1"})
                    return
                products = [dict(p) for p in cat.products]
            if url.path == "/odata/v1/DeletedProducts":
                flt = q["$filter"][0]
                assert "Collection/Name eq 'SENTINEL-2'" in flt and q["$orderby"] == ["DeletionDate asc"]
                m = re.search(r"DeletionDate ge (\S+)", flt)
                assert m is not None
                gone = sorted(
                    (d for d in cat.deleted if _parse(d["DeletionDate"]) >= _parse(m.group(1))),
                    key=lambda d: (_parse(d["DeletionDate"]), d["Id"]),
                )
                self._send(200, {"@odata.context": "$metadata#DeletedProducts", "value": gone[: int(q["$top"][0])]})
                return
            if url.path != "/odata/v1/Products":
                self._send(404, {"detail": "not found"})
                return
            if int(q.get("$skip", ["0"])[0]) > 10000:
                self._send(422, {"detail": "skip beyond 10000"})
                return
            flt = q["$filter"][0]
            assert "Collection/Name eq 'SENTINEL-2'" in flt and "Value eq 'S2MSI2A'" in flt
            assert "OData.CSC.Intersects(area=geography'SRID=4326;POLYGON" in flt
            m = re.search(r"PublicationDate ge (\S+)", flt)
            if m:
                products = [p for p in products if _parse(p["PublicationDate"]) >= _parse(m.group(1))]
            m = re.search(r"ContentDate/Start ge (\S+)", flt)
            if m:
                products = [p for p in products if _parse(p["ContentDate"]["Start"]) >= _parse(m.group(1))]
            assert q["$orderby"] == ["PublicationDate asc"]
            products.sort(key=lambda p: (_parse(p["PublicationDate"]), p["Id"]))
            top = int(q.get("$top", ["20"])[0])
            self._send(200, {"@odata.context": "$metadata#Products", "value": products[:top]})

    return Handler


@pytest.fixture
def odata(free_ports_factory: Any) -> Iterator[tuple[str, Catalogue]]:
    cat = Catalogue()
    (port,) = free_ports_factory(1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _handler(cat))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{port}/odata/v1", cat
    finally:
        server.shutdown()
        server.server_close()


def _scenes(pg_dsn: str) -> dict[str, str]:
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT acq_key, product_id FROM scenes")
        return {r[0]: r[1] for r in cur.fetchall()}


def key_of(day: int) -> str:
    acq = NOW - timedelta(days=day)
    return f"S2B_MSIL2A_{acq:%Y%m%d}T102021_R065_T32UPU"


def test_odata_keyset_paging_offline_and_rejections(
    odata: tuple[str, Catalogue], cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path
) -> None:
    from cbmflow.parcels.ingest import add_aoi

    url, cat = odata
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": AOI}))
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "bayern", path)
    same_time = T0 + timedelta(minutes=2)
    broken = product(4, T0 + timedelta(minutes=3))
    del broken["GeoFootprint"]
    offline = product(5, T0 + timedelta(minutes=4), online=False)
    cat.products = [
        product(1, T0 + timedelta(minutes=1)),
        product(2, same_time),
        product(3, same_time),  # the same publication time as day 2, across the page boundary
        broken,
        offline,
        product(6, T0 + timedelta(minutes=5)),
        product(1, T0 + timedelta(minutes=6), baseline="0511"),  # reprocessed
    ]
    cat.throttle = 2
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    settings = WatchSettings(
        sources=[
            SourceSettings(name="cdse-odata", kind="odata", url=url, collections=["SENTINEL-2/S2MSI2A"], rate_per_s=100)
        ],
        page_size=2,
        overlap_s=600,
        retry_max_wait_s=1,
    )
    first = watch_once(dsn=pg_dsn, bus=bus, settings=settings)
    assert cat.served_429 == 2
    assert (first.new, first.superseded, first.offline) == (4, 1, 1)
    assert [r.split(":")[0] for r in first.rejected] == [f"cdse-odata/SENTINEL-2/S2MSI2A/{name_of(4)}.SAFE"]
    assert _scenes(pg_dsn) == {
        key_of(1): name_of(1, "0511"),
        key_of(2): name_of(2),
        key_of(3): name_of(3),
        key_of(6): name_of(6),
    }
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT published_hwm FROM watch_cursors WHERE collection = 'SENTINEL-2/S2MSI2A'")
        (hwm,) = cur.fetchone() or (None,)
        cur.execute("SELECT location FROM scenes WHERE acq_key = %s", (key_of(2),))
        (location,) = cur.fetchone() or ("",)
    assert hwm == T0 + timedelta(minutes=3), "the cursor waits before the offline product"
    assert location.startswith("s3://eodata/Sentinel-2/MSI/L2A/") and location.endswith(f"{name_of(2)}.SAFE")

    offline["Online"] = True
    cat.deleted.append(
        {
            "Id": str(uuid.uuid4()),
            "Name": name_of(2) + ".SAFE",
            "DeletionDate": _odata_time(T0 + timedelta(minutes=50)),
            "DeletionCause": "Duplicated product",
        }
    )
    second = watch_once(dsn=pg_dsn, bus=bus, settings=settings)
    assert (second.new, second.superseded, second.published, second.deleted) == (1, 0, 1, 1)
    assert key_of(5) in _scenes(pg_dsn)
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT acq_key, deleted_at FROM scenes WHERE deleted_at IS NOT NULL")
        marked = cur.fetchall()
    assert marked == [(key_of(2), T0 + timedelta(minutes=50))], "a deleted product's scene is marked and kept"
    third = watch_once(dsn=pg_dsn, bus=bus, settings=settings)
    assert (third.new, third.published, third.deleted) == (0, 0, 0)
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT published_hwm FROM watch_cursors WHERE collection = 'SENTINEL-2/S2MSI2A'")
        (hwm,) = cur.fetchone() or (None,)
        cur.execute("SELECT count(*), count(DISTINCT body->>'product_id') FROM outbox")
        total, distinct = cur.fetchone() or (0, 0)
    assert hwm == T0 + timedelta(minutes=6)
    assert total == distinct == 6, "every product published once across three polls"
    assert all("$skip" not in q for q in cat.requests), "paging is keyset, never $skip"
    # Pages of 2, and one page of 1000 where a full page was all one publication time already seen.
    assert {q["$top"][0] for q in cat.requests if "$top" in q} == {"2", "1000"}
