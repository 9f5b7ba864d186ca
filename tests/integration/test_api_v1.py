"""``/api/v1``, tokens, health and metrics on a real PostgreSQL: values against the seeded rows,
tenancy on every route (including the ones without an aoi parameter), and injection strings."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest
from starlette.testclient import TestClient
from test_api import ALICE, BOB, INJECTIONS, ROOT, Seed, _db_value, _error, _expected, _json, _seed
from typer.testing import CliRunner

from api.app import create_app
from cbmflow import db
from cbmflow.settings import ApiSettings

BASE = "/api/v1/datasets/ms/2024"


@pytest.fixture
def seed(pg_dsn: str) -> Seed:
    return _seed(pg_dsn)


@pytest.fixture
def client(seed: Seed) -> Iterator[TestClient]:
    # The API's own role (SELECT only), as deployed: every route must work without write grants.
    with TestClient(create_app(db.role_dsn(seed.dsn, "api"), ApiSettings(auth_cache_s=300))) as c:
        yield c


def _iso(seed: Seed, label: str) -> str:
    return seed.acquired[label].isoformat().replace("+00:00", "Z")


def test_datasets_and_parcel_geojson(client: TestClient, seed: Seed) -> None:
    assert _json(client.get("/api/v1/datasets", auth=ALICE)) == {
        "datasets": [{"aoi": "ms", "year": 2024, "srid": 3035, "description": ""}]
    }
    assert [d["aoi"] for d in _json(client.get("/api/v1/datasets", auth=ROOT))["datasets"]] == ["br", "ms"]
    assert _json(client.get("/api/v1/datasets", auth=BOB)) == {"datasets": []}

    resp = client.get(f"{BASE}/parcel", params={"pid": "O'Neil; --"}, auth=ALICE)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/geo+json"
    feature = resp.json()
    assert feature["type"] == "Feature" and feature["id"] == "O'Neil; --"
    assert feature["properties"] == {
        "pid": "O'Neil; --",
        "aoi": "ms",
        "year": 2024,
        "crop_name": "wheat",
        "crop_code": "1101",
        "srid": 3035,
        "area_m2": 10000.0,
    }
    expect = json.loads(
        _db_value(seed.dsn, "SELECT ST_AsGeoJSON(ST_Transform(geom, 4326), 9) FROM ms.parcels_2024 WHERE pid = 5")
    )
    assert feature["geometry"] == expect and feature["geometry"]["type"] == "MultiPolygon"
    _error(client.get(f"{BASE}/parcel", params={"pid": "P-404"}, auth=ALICE), 404, "not_found")
    _error(client.get("/api/v1/datasets/ms/2023/parcel", params={"pid": "P-1"}, auth=ALICE), 404, "not_found")


def test_timeseries_period_bands_and_formats(client: TestClient, seed: Seed) -> None:
    body = _json(client.get(f"{BASE}/timeseries", params={"pid": "P-1"}, auth=ALICE))
    rows = _expected(seed, 1, "s2")
    obs = body["observations"]
    assert [(o["acquired"], o["band"]) for o in obs] == [(_iso(seed, r[1]), r[2]) for r in rows]
    assert [o["scene_id"] for o in obs] == [seed.scenes[r[1]] for r in rows]
    for i, key in enumerate(("count", "mean", "std", "min", "max", "p25", "p50", "p75"), start=3):
        assert [o[key] for o in obs] == [r[i] for r in rows], key

    may = _json(
        client.get(
            f"{BASE}/timeseries",
            params={"pid": "P-1", "from": "2024-05-01", "to": "2024-05-01", "bands": "B8"},
            auth=ALICE,
        )
    )["observations"]
    assert [(o["acquired"], o["band"]) for o in may] == [(_iso(seed, "may"), "B08")]
    spring = _json(
        client.get(
            f"{BASE}/timeseries",
            params={"pid": "P-1", "from": "2024-04-01T00:00:00Z", "to": "2024-05-31", "bands": "B04,B08"},
            auth=ALICE,
        )
    )["observations"]
    assert [o["acquired"] for o in spring] == [_iso(seed, "apr")] * 2 + [_iso(seed, "may")] * 2
    bs = _json(client.get(f"{BASE}/timeseries", params={"pid": "P-1", "card": "bs"}, auth=ALICE))["observations"]
    assert [o["band"] for o in bs] == ["VHb", "VVb"]

    resp = client.get(f"{BASE}/timeseries", params={"pid": "P-1", "format": "csv"}, auth=ALICE)
    assert resp.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(resp.text)))
    assert [float(r["mean"]) for r in table] == [o["mean"] for o in obs]
    resp = client.get(f"{BASE}/timeseries", params={"pid": "P-1", "format": "parquet"}, auth=ALICE)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/vnd.apache.parquet"
    frame = pq.read_table(io.BytesIO(resp.content)).to_pylist()
    assert frame == obs
    empty = client.get(f"{BASE}/timeseries", params={"pid": "P-3", "format": "parquet"}, auth=ALICE)
    assert pq.read_table(io.BytesIO(empty.content)).num_rows == 0

    for bad in (
        {"pid": "P-1", "from": "yesterday"},
        {"pid": "P-1", "from": "2024-06-01", "to": "2024-05-01"},
        {"pid": "P-1", "format": "xlsx"},
        {"pid": "P-1", "card": "s3"},
        {"pid": "P-1", "bands": "B0 4"},
        {},
    ):
        _error(client.get(f"{BASE}/timeseries", params=bad, auth=ALICE), 400, "invalid_input")
    _error(client.get("/api/v1/datasets/MS!/2024/timeseries?pid=P-1", auth=ALICE), 400, "invalid_input")
    _error(client.get("/api/v1/datasets/ms/20x4/timeseries?pid=P-1", auth=ALICE), 400, "invalid_input")


def test_ndvi_with_scl_cloud_filtering(client: TestClient, seed: Seed) -> None:
    """P-1: apr hist {4:50, 8:3, 10:1} → 4/54 masked; may {4:90, 9:8} → 8/98; jun has no histogram."""
    means = {(r[1], r[2]): r[4] for r in seed.sigs if r[0] == 1}

    def ndvi(label: str) -> float:
        nir, red = means[(label, "B08")], means[(label, "B04")]
        return (nir - red) / (nir + red)

    body = _json(client.get(f"{BASE}/index", params={"pid": "P-1"}, auth=ALICE))
    assert body["index"] == "ndvi" and body["bands"] == ["B08", "B04"] and body["max_cloud"] == 0.1
    assert [(o["acquired"], o["value"]) for o in body["observations"]] == [
        (_iso(seed, "apr"), pytest.approx(ndvi("apr"))),
        (_iso(seed, "may"), pytest.approx(ndvi("may"))),
    ]
    assert body["observations"][0]["cloud"] == pytest.approx(4 / 54) and body["dropped"] == 1  # jun: unknown

    strict = _json(client.get(f"{BASE}/index", params={"pid": "P-1", "max_cloud": "0.075"}, auth=ALICE))
    assert [o["acquired"] for o in strict["observations"]] == [_iso(seed, "apr")] and strict["dropped"] == 2
    everything = _json(client.get(f"{BASE}/index", params={"pid": "P-1", "max_cloud": "1"}, auth=ALICE))
    assert len(everything["observations"]) == 3 and everything["observations"][2]["cloud"] is None
    only_cirrus = _json(client.get(f"{BASE}/index", params={"pid": "P-1", "mask": "10", "max_cloud": "0"}, auth=ALICE))
    assert [o["acquired"] for o in only_cirrus["observations"]] == [_iso(seed, "may")]
    custom = _json(client.get(f"{BASE}/index", params={"pid": "P-1", "index": "nd", "bands": "B4,B8"}, auth=ALICE))
    assert custom["observations"][0]["value"] == pytest.approx(-ndvi("apr"))
    csv_resp = client.get(f"{BASE}/index", params={"pid": "P-1", "format": "csv"}, auth=ALICE)
    assert csv_resp.text.splitlines()[0] == "acquired,scene_id,value,cloud" and len(csv_resp.text.splitlines()) == 3
    for bad in ({"index": "evi"}, {"index": "nd", "bands": "B04"}, {"max_cloud": "2"}, {"mask": "3,x"}, {"mask": "12"}):
        _error(client.get(f"{BASE}/index", params={"pid": "P-1", **bad}, auth=ALICE), 400, "invalid_input")

    png = client.get(f"{BASE}/plot.png", params={"pid": "P-1"}, auth=ALICE)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n") and len(png.content) > 1000
    _error(client.get(f"{BASE}/plot.png", params={"pid": "nope"}, auth=ALICE), 404, "not_found")


def test_scenes_catalogue_is_filtered_by_grants(client: TestClient, seed: Seed) -> None:
    with db.transaction(seed.dsn) as cur:
        cur.execute(
            "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint, location,"
            " status, reason) VALUES ('id-br', 'PRODUCT_BR', 'sentinel', 'S2B', 's2', '2024-05-02T13:00:00Z',"
            " ST_Multi(ST_MakeEnvelope(-48, -16, -47, -15, 4326)), '/x', 'failed', 'unreadable')"
        )
    alice = _json(client.get("/api/v1/scenes", auth=ALICE))
    assert [s["product_id"] for s in alice["scenes"]] == ["id-jun", "id-may", "id-s1", "id-apr"]
    assert alice["scenes"][0]["status"] == "extracted" and alice["scenes"][0]["acquired"] == _iso(seed, "jun")
    root = _json(client.get("/api/v1/scenes", params={"status": "failed"}, auth=ROOT))["scenes"]
    assert [(s["product_id"], s["reason"]) for s in root] == [("id-br", "unreadable")]
    assert _json(client.get("/api/v1/scenes", auth=BOB))["scenes"] == []  # bob's xx has no AOI yet
    page = _json(client.get("/api/v1/scenes", params={"card": "s2", "limit": 1, "offset": 1}, auth=ALICE))
    assert [s["product_id"] for s in page["scenes"]] == ["id-may"]
    window = _json(client.get("/api/v1/scenes", params={"from": "2024-04-10", "to": "2024-05-01"}, auth=ALICE))
    assert [s["product_id"] for s in window["scenes"]] == ["id-may", "id-s1"]
    _error(client.get("/api/v1/scenes", params={"aoi": "br"}, auth=ALICE), 403, "forbidden")
    _error(client.get("/api/v1/scenes", params={"aoi": "zz"}, auth=ROOT), 404, "not_found")
    _error(client.get("/api/v1/scenes", params={"status": "done"}, auth=ALICE), 400, "invalid_input")


V1_ROUTES = [
    f"{BASE}/parcel?pid=P-1",
    f"{BASE}/timeseries?pid=P-1",
    f"{BASE}/timeseries?pid=P-1&format=parquet",
    f"{BASE}/index?pid=P-1",
    f"{BASE}/plot.png?pid=P-1",
    "/api/v1/scenes?aoi=ms",
]


def test_v1_auth_and_cross_tenant(client: TestClient) -> None:
    for url in [*V1_ROUTES, "/api/v1/datasets", "/api/v1/scenes"]:
        resp = client.get(url)
        _error(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == 'Basic realm="cbmflow"'
        assert client.get(url, auth=ALICE).status_code == 200, url
    for url in V1_ROUTES:
        _error(client.get(url, auth=BOB), 403, "forbidden")
    _error(client.get("/api/v1/datasets/br/2024/parcel?pid=B-1", auth=ALICE), 403, "forbidden")
    _error(client.get("/api/v1/datasets/br/1999/parcel?pid=B-1", auth=ALICE), 403, "forbidden")


def test_v1_injection_is_rejected_and_harmless(client: TestClient, seed: Seed) -> None:
    before = _db_value(seed.dsn, "SELECT count(*) FROM ms.sigs_2024") + _db_value(
        seed.dsn, "SELECT count(*) FROM users"
    )
    for evil in INJECTIONS:
        for url, params in (
            (f"{BASE}/parcel", {"pid": evil}),
            (f"{BASE}/timeseries", {"pid": evil}),
            (f"{BASE}/timeseries", {"pid": "P-1", "bands": evil}),
            (f"{BASE}/timeseries", {"pid": "P-1", "from": evil}),
            (f"{BASE}/timeseries", {"pid": "P-1", "card": evil}),
            (f"{BASE}/index", {"pid": "P-1", "index": evil}),
            (f"{BASE}/index", {"pid": "P-1", "mask": evil}),
            (f"{BASE}/timeseries", {"pid": "P-1", "ptype": evil}),
            ("/api/v1/scenes", {"aoi": evil}),
            ("/api/v1/scenes", {"status": evil}),
        ):
            resp = client.get(url, params=params, auth=ROOT)
            assert 400 <= resp.status_code < 500, (url, params, resp.text)
            assert "error" in resp.json()
        resp = client.get(f"/api/v1/datasets/{evil.replace('/', '')}/2024/parcel", params={"pid": "P-1"}, auth=ROOT)
        assert resp.status_code in (400, 404) and "error" in resp.json()
    after = _db_value(seed.dsn, "SELECT count(*) FROM ms.sigs_2024") + _db_value(seed.dsn, "SELECT count(*) FROM users")
    assert after == before


def test_api_tokens(client: TestClient, seed: Seed, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from api.cli import register

    monkeypatch.setenv("CBMFLOW_DB_DSN", seed.dsn)
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["users", "token", "alice"])
    assert res.exit_code == 0, res.output
    token = res.stdout.strip().splitlines()[0]
    assert token.startswith("cbmf_")
    stored = _db_value(seed.dsn, "SELECT secret_sha256 FROM api_tokens WHERE user_name = 'alice'")
    assert token.split("_", 2)[2] not in stored and len(stored) == 64

    url = f"{BASE}/parcel?pid=P-1"
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get(url, headers=bearer).status_code == 200
    assert client.get(url, auth=("alice", token)).status_code == 200  # as the Basic password (JRC client)
    _error(client.get(url, auth=("root", token)), 401, "unauthorized")  # someone else's token
    _error(client.get("/api/v1/datasets/br/2024/parcel?pid=B-1", headers=bearer), 403, "forbidden")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    _error(client.get(url, headers={"Authorization": f"Bearer {forged}"}), 401, "unauthorized")
    _error(client.get(url, headers={"Authorization": "Bearer ' OR 1=1 --"}), 401, "unauthorized")

    listed = CliRunner().invoke(app, ["users", "token", "alice", "--list"])
    assert token[5:17] in listed.output
    res = CliRunner().invoke(app, ["users", "token", "alice", "--revoke", token[5:17]])
    assert res.exit_code == 0, res.output
    _error(client.get(url, headers=bearer), 401, "unauthorized")  # revocation is immediate
    assert CliRunner().invoke(app, ["users", "token", "nobody"]).exit_code == 1


def test_healthz_metrics_and_openapi(client: TestClient) -> None:
    assert _json(client.get("/healthz")) == {"status": "ok", "database": "ok"}
    client.get(f"{BASE}/parcel?pid=P-1", auth=ALICE)
    client.get(f"{BASE}/parcel?pid=P-1", auth=BOB)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'cbmflow_api_requests_total{route="/api/v1/datasets/{aoi}/{year}/parcel",status="403"}' in text
    assert "cbmflow_api_request_seconds_bucket" in text and "P-1" not in text
    doc: dict[str, Any] = _json(client.get("/api/v1/openapi.json"))
    assert doc["openapi"].startswith("3.") and "/api/v1/datasets/{aoi}/{year}/index" in doc["paths"]
