"""The REST API on a real PostgreSQL/PostGIS: JRC-compatible shapes and values, auth, tenancy,
the JSON error contract, injection resistance, the users CLI and a real uvicorn server."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests
import typer
from starlette.testclient import TestClient
from typer.testing import CliRunner

import api.auth
from api.app import create_app
from api.auth import hash_password, verify
from api.cli import register
from cbmflow import db
from cbmflow.dev.api_process import free_port
from cbmflow.settings import ApiSettings

REPO = Path(__file__).resolve().parents[2]

ALICE = ("alice", "alice-secret-1")  # granted ms
BOB = ("bob", "bob-secret-123")  # granted xx only
ROOT = ("root", "root-secret-12")  # admin

# 3035's false origin is (10°E, 52°N) at (4321000, 3210000): parcels there have known WGS84 centroids.
X0, Y0 = 4321000, 3210000


@cache
def _hash(password: str) -> str:
    return hash_password(password)


@dataclass(frozen=True)
class Seed:
    dsn: str
    scenes: dict[str, int]  # label → scene id
    sigs: list[tuple[int, str, str, int, float, float, float, float, float, float, float]]
    hists: dict[tuple[int, str], dict[str, int]]  # (pid, scene label) → {class: count}
    acquired: dict[str, datetime]


def _rect(x: float, y: float, w: float, h: float) -> str:
    return f"MULTIPOLYGON((({x} {y},{x + w} {y},{x + w} {y + h},{x} {y + h},{x} {y})))"


PARCELS = [
    # pid, parcel_id, crop_code, crop_name, geometry (EPSG:3035)
    (1, "P-1", "1101", "wheat", _rect(X0, Y0, 100, 50)),  # 5000 m²
    (2, "P-2", "1101", "wheat", _rect(X0 + 200, Y0, 100, 100)),  # 100 m east of P-1
    (3, "P-3", "2201", "maize", _rect(X0, Y0 + 100, 100, 100)),  # 50 m north of P-1, other crop
    (4, "P-4", "1101", "wheat", _rect(X0 + 2100, Y0, 100, 100)),  # 2000 m east of P-1
    (5, "O'Neil; --", "1101", "wheat", _rect(X0 - 400, Y0, 100, 100)),  # an id full of SQL characters
]

SCENES = [
    # label, card, acquired (inserted out of time order on purpose)
    ("may", "s2", datetime(2024, 5, 1, 10, 30, 21, tzinfo=UTC)),
    ("apr", "s2", datetime(2024, 4, 1, 10, 30, 19, tzinfo=UTC)),
    ("jun", "s2", datetime(2024, 6, 1, 10, 30, 25, tzinfo=UTC)),
    ("s1", "bs", datetime(2024, 4, 15, 5, 40, 0, tzinfo=UTC)),
]


def _seed(dsn: str) -> Seed:
    scenes: dict[str, int] = {}
    sigs = []
    hists: dict[tuple[int, str], dict[str, int]] = {}
    with db.transaction(dsn) as cur:
        cur.execute(
            "INSERT INTO aois (name, geom) VALUES ('ms', ST_Multi(ST_MakeEnvelope(9, 51, 11, 53, 4326))),"
            " ('br', ST_Multi(ST_MakeEnvelope(-48, -16, -47, -15, 4326)))"
        )
        ms = db.ensure_dataset(cur, "ms", 2024, 3035)
        br = db.ensure_dataset(cur, "br", 2024, 4326)
        for pid, parcel_id, code, name, wkt in PARCELS:
            cur.execute(
                f"INSERT INTO ms.{ms.parcel_table} (pid, parcel_id, crop_code, crop_name, geom)"  # noqa: S608
                " VALUES (%s, %s, %s, %s, ST_GeomFromText(%s, 3035))",
                (pid, parcel_id, code, name, wkt),
            )
        cur.execute(
            f"INSERT INTO br.{br.parcel_table} (pid, parcel_id, crop_code, crop_name, geom)"  # noqa: S608
            " VALUES (1, 'B-1', '7', 'soy', ST_Multi(ST_MakeEnvelope(-47.91, -15.81, -47.90, -15.80, 4326)))"
        )
        # a ptype variant table in the same pid space (JRC: grazing parcels)
        cur.execute("CREATE TABLE ms.parcels_2024_g (LIKE ms.parcels_2024 INCLUDING ALL)")
        cur.execute(
            "INSERT INTO ms.parcels_2024_g SELECT pid, 'G-' || pid, crop_code, 'grass', geom"
            " FROM ms.parcels_2024 WHERE pid = 1"
        )
        for label, card, acquired in SCENES:
            cur.execute(
                "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint,"
                " location, status) VALUES (%s, %s, %s, %s, %s, %s,"
                " ST_Multi(ST_MakeEnvelope(9, 51, 11, 53, 4326)), '/nowhere', 'extracted') RETURNING id",
                (f"id-{label}", f"PRODUCT_{label.upper()}", "sentinel", "S2A", card, acquired),
            )
            scenes[label] = cur.fetchone()[0]
        k = 0
        for pid in (1, 2):
            for label, card, _ in SCENES:
                for band in ("B04", "B08") if card == "s2" else ("VVb", "VHb"):
                    k += 1
                    row = (pid, label, band, 10 + k, 0.5 * k, 0.25 * k, 0.125 * k, 2.0 * k, 0.75 * k, k + 0.0, 1.5 * k)
                    sigs.append(row)
                    cur.execute(
                        f"INSERT INTO ms.{ms.sigs_table} (pid, scene_id, band, count, mean, std, min, max,"  # noqa: S608
                        " p25, p50, p75) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (pid, scenes[label], *row[2:]),
                    )
        # histograms for two of the three S2 scenes: 'jun' has none (kept by the LEFT JOIN)
        for (pid, label), hist in {
            (1, "may"): {"4": 90, "9": 8},
            (1, "apr"): {"4": 50, "8": 3, "10": 1},
            (2, "may"): {"5": 7},
        }.items():
            hists[(pid, label)] = hist
            for cls, count in hist.items():
                cur.execute(
                    f"INSERT INTO ms.{ms.hists_table} (pid, scene_id, class, count) VALUES (%s, %s, %s, %s)",  # noqa: S608
                    (pid, scenes[label], int(cls), count),
                )
        for (name, password), admin, grants in ((ALICE, False, ["ms"]), (BOB, False, ["xx"]), (ROOT, True, [])):
            cur.execute(
                "INSERT INTO users (name, password_hash, is_admin) VALUES (%s, %s, %s)", (name, _hash(password), admin)
            )
            for aoi in grants:
                cur.execute("INSERT INTO user_grants (user_name, aoi) VALUES (%s, %s)", (name, aoi))
    return Seed(dsn, scenes, sigs, hists, {label: at for label, _, at in SCENES})


@pytest.fixture
def seed(pg_dsn: str) -> Seed:
    return _seed(pg_dsn)


@pytest.fixture
def client(seed: Seed) -> Iterator[TestClient]:
    # The API's own role (SELECT only), as deployed: every route must work without write grants.
    with TestClient(create_app(db.role_dsn(seed.dsn, "api"), ApiSettings(auth_cache_s=300))) as c:
        yield c


def _json(resp: Any, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json", resp.headers
    return resp.json()


def _error(resp: Any, status: int, code: str) -> dict[str, str]:
    body = _json(resp, status)
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"], body
    return dict(body["error"])


def _db_value(dsn: str, query: str, args: tuple[Any, ...] | None = None) -> Any:
    with db.transaction(dsn) as cur:
        cur.execute(query, args)
        return cur.fetchone()[0]


# ---------------------------------------------------------------- parcels


def test_parcel_by_id_values(client: TestClient, seed: Seed) -> None:
    body = _json(client.get("/query/parcelByID", params={"aoi": "ms", "year": 2024, "pid": "P-1"}, auth=ALICE))
    assert list(body) == ["pid", "cropname", "cropcode", "srid", "area", "clon", "clat"]
    with db.transaction(seed.dsn) as cur:
        cur.execute(
            "SELECT ST_X(c), ST_Y(c) FROM"
            " (SELECT ST_Transform(ST_Centroid(geom), 4326) AS c FROM ms.parcels_2024 WHERE pid = 1) t"
        )
        clon, clat = cur.fetchone()
    assert body == {
        "pid": ["P-1"],
        "cropname": ["wheat"],
        "cropcode": ["1101"],
        "srid": [3035],
        "area": [5000],
        "clon": [clon],
        "clat": [clat],
    }
    assert abs(clon - 10.0) < 0.01 and abs(clat - 52.0) < 0.01

    geo = _json(
        client.get(
            "/query/parcelByID", params={"aoi": "ms", "year": "2024", "pid": "P-2", "withGeometry": "True"}, auth=ALICE
        )
    )
    assert geo["area"] == [10000]
    native = json.loads(geo["geom"][0])
    assert native["type"] == "MultiPolygon" and native["crs"]["properties"]["name"] == "EPSG:3035"
    assert native["coordinates"][0][0][0] == [X0 + 200, Y0]

    wgs = _json(
        client.get(
            "/query/parcelByID?aoi=ms&year=2024&pid=P-2&withGeometry=true&wgs84=1", auth=ALICE
        )  # lower-case and 1/0 booleans are accepted too
    )
    lon, lat = json.loads(wgs["geom"][0])["coordinates"][0][0][0]
    assert abs(lon - 10.003) < 0.01 and abs(lat - 52.0) < 0.01
    assert wgs["srid"] == [3035]  # JRC reports the native SRID even with wgs84

    odd = _json(client.get("/query/parcelByID", params={"aoi": "MS", "year": 2024, "pid": "O'Neil; --"}, auth=ALICE))
    assert odd["pid"] == ["O'Neil; --"] and odd["area"] == [10000]


def test_parcel_by_location(client: TestClient) -> None:
    hit = _json(
        client.get(
            "/query/parcelByLocation", params={"aoi": "ms", "year": 2024, "lon": 10.0005, "lat": 52.0002}, auth=ALICE
        )
    )
    assert hit["pid"] == ["P-1"] and hit["area"] == [5000]
    miss = _json(
        client.get("/query/parcelByLocation", params={"aoi": "ms", "year": 2024, "lon": 10.5, "lat": 52}, auth=ALICE)
    )
    assert miss == {k: [] for k in ("pid", "cropname", "cropcode", "srid", "area", "clon", "clat")}
    south = _json(
        client.get(
            "/query/parcelByLocation", params={"aoi": "br", "year": 2024, "lon": -47.905, "lat": -15.805}, auth=ROOT
        )
    )
    assert south["pid"] == ["B-1"] and south["srid"] == [4326]


def test_parcels_by_polygon_legacy_and_extensions(client: TestClient) -> None:
    box = "9.99_51.99-10.005_51.99-10.005_52.01-9.99_52.01-9.99_51.99"  # covers P-1, P-2, P-3, the odd one
    ids = _json(client.get(f"/query/parcelsByPolygon?aoi=ms&year=2024&polygon={box}", auth=ALICE))
    assert ids == {"pid": ["P-1", "P-2", "P-3", "O'Neil; --"]}
    full = _json(
        client.get(
            "/query/parcelsByPolygon",
            params={"aoi": "ms", "year": 2024, "polygon": box, "only_ids": "False"},
            auth=ALICE,
        )
    )
    assert full["pid"] == ids["pid"] and full["area"] == [5000, 10000, 10000, 10000]
    assert set(full) == {"pid", "cropname", "cropcode", "srid", "area", "clon", "clat"}
    limited = _json(client.get(f"/query/parcelsByPolygon?aoi=ms&year=2024&polygon={box}&limit=2", auth=ALICE))
    assert limited == {"pid": ["P-1", "P-2"]}
    unclosed = box.rsplit("-", 1)[0]
    assert _json(client.get(f"/query/parcelsByPolygon?aoi=ms&year=2024&polygon={unclosed}", auth=ALICE)) == ids

    # negative coordinates: impossible in the legacy encoding, unambiguous with wkt= and geojson=
    ring = [[-48, -16], [-47, -16], [-47, -15], [-48, -15], [-48, -16]]
    wkt = "POLYGON((" + ", ".join(f"{x} {y}" for x, y in ring) + "))"
    gj = json.dumps({"type": "Polygon", "coordinates": [ring]})
    feature = json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}})
    for extra in ({"wkt": wkt}, {"geojson": gj}, {"geojson": feature}):
        body = _json(client.get("/query/parcelsByPolygon", params={"aoi": "br", "year": 2024, **extra}, auth=ROOT))
        assert body == {"pid": ["B-1"]}, extra
    legacy_negative = "-48_-16--47_-16--47_-15--48_-15"
    _error(
        client.get(
            "/query/parcelsByPolygon", params={"aoi": "br", "year": 2024, "polygon": legacy_negative}, auth=ROOT
        ),
        400,
        "invalid_input",
    )
    for bad in (
        {},  # none given
        {"polygon": box, "wkt": wkt},  # two given
        {"wkt": "POINT(10 52)"},
        {"wkt": "POLYGON((0 0, 1 1, 1 0, 0 1, 0 0))"},  # self-intersecting
        {"wkt": "POLYGON((0 0, 400 0, 400 10, 0 0))"},  # not lon/lat
        {"geojson": "{not json"},
        {"geojson": '{"type": "Polygon", "coordinates": "x"}'},
        {"polygon": "1_2-3_4"},
        {"polygon": "a_b-c_d-e_f"},
        {"polygon": "nan_1-2_3-4_5"},
    ):
        _error(
            client.get("/query/parcelsByPolygon", params={"aoi": "ms", "year": 2024, **bad}, auth=ALICE),
            400,
            "invalid_input",
        )


def test_parcel_peers(client: TestClient) -> None:
    near = _json(client.get("/query/parcelPeers", params={"aoi": "ms", "year": 2024, "pid": "P-1"}, auth=ALICE))
    assert near == {"pids": ["P-2", "O'Neil; --"], "distance": [100.0, 300.0]}  # P-3: maize; P-4: too far
    far = _json(
        client.get("/query/parcelPeers", params={"aoi": "ms", "year": 2024, "pid": "P-1", "distance": 5000}, auth=ALICE)
    )
    assert far == {"pids": ["P-2", "O'Neil; --", "P-4"], "distance": [100.0, 300.0, 2000.0]}
    one = _json(
        client.get(
            "/query/parcelPeers",
            params={"aoi": "ms", "year": 2024, "pid": "P-1", "distance": 5000, "max": 1},
            auth=ALICE,
        )
    )
    assert one == {"pids": ["P-2"], "distance": [100.0]}
    capped = _json(
        client.get(
            "/query/parcelPeers",
            params={"aoi": "ms", "year": 2024, "pid": "P-1", "distance": 5000, "max": 10**7},
            auth=ALICE,
        )
    )
    assert capped["pids"] == ["P-2", "O'Neil; --", "P-4"]
    big = _json(
        client.get(
            "/query/parcelPeers",
            params={"aoi": "ms", "year": 2024, "pid": "P-1", "distance": 5000, "min_area": 10001},
            auth=ALICE,
        )
    )
    assert big == {"pids": [], "distance": []}
    _error(
        client.get("/query/parcelPeers", params={"aoi": "ms", "year": 2024, "pid": "nope"}, auth=ALICE),
        404,
        "not_found",
    )
    _error(
        client.get("/query/parcelPeers", params={"aoi": "ms", "year": 2024, "pid": "P-1", "max": 0}, auth=ALICE),
        400,
        "invalid_input",
    )


# ---------------------------------------------------------------- time series


def _expected(seed: Seed, pid: int, card: str, bands: tuple[str, ...] | None = None) -> list[tuple[Any, ...]]:
    cards = {label: c for label, c, _ in SCENES}
    rows = [r for r in seed.sigs if r[0] == pid and cards[r[1]] == card and (bands is None or r[2] in bands)]
    rows.sort(key=lambda r: (seed.acquired[r[1]], r[2]))
    return rows


def _check_rows(body: dict[str, list[Any]], rows: list[tuple[Any, ...]], seed: Seed) -> None:
    assert body["date_part"] == [seed.acquired[r[1]].timestamp() for r in rows]
    assert body["band"] == [r[2] for r in rows]
    for i, key in enumerate(("count", "mean", "std", "min", "max", "p25", "p50", "p75"), start=3):
        assert body[key] == [r[i] for r in rows], key


def test_time_series_values_order_and_hist(client: TestClient, seed: Seed) -> None:
    # the JRC client's request, URL built by string formatting
    body = _json(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=s2", auth=ALICE))
    assert list(body) == ["date_part", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max", "hist"]
    rows = _expected(seed, 1, "s2")
    assert [r[1] for r in rows] == ["apr", "apr", "may", "may", "jun", "jun"]
    _check_rows(body, rows, seed)
    assert body["hist"] == [
        {"4": 50, "8": 3, "10": 1},
        {"4": 50, "8": 3, "10": 1},
        {"4": 90, "9": 8},
        {"4": 90, "9": 8},
        {},  # no histogram for 'jun': kept (JRC's inner join dropped these rows)
        {},
    ]
    assert list(body["hist"][0]) == ["4", "8", "10"]

    plain = _json(
        client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=s2&scl=False&ref=True", auth=ALICE)
    )
    assert "hist" not in plain
    assert plain["reference"] == ["PRODUCT_APR"] * 2 + ["PRODUCT_MAY"] * 2 + ["PRODUCT_JUN"] * 2
    _check_rows(plain, rows, seed)

    default_tstype = _json(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1", auth=ALICE))
    assert default_tstype == body

    other = _json(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-2&tstype=s2", auth=ALICE))
    _check_rows(other, _expected(seed, 2, "s2"), seed)
    assert other["hist"] == [{}, {}, {"5": 7}, {"5": 7}, {}, {}]


def test_time_series_bands_cards_scl_and_csv(client: TestClient, seed: Seed) -> None:
    for band, expect in (
        ("B4", ("B04",)),
        ("B04", ("B04",)),
        ("b08", ("B08",)),
        ("B8", ("B08",)),
        ("B4,B8", ("B04", "B08")),
    ):
        body = _json(
            client.get(
                "/query/parcelTimeSeries", params={"aoi": "ms", "year": 2024, "pid": "P-1", "band": band}, auth=ALICE
            )
        )
        _check_rows(body, _expected(seed, 1, "s2", expect), seed)
    none = _json(
        client.get(
            "/query/parcelTimeSeries", params={"aoi": "ms", "year": 2024, "pid": "P-1", "band": "B11"}, auth=ALICE
        )
    )
    assert all(v == [] for v in none.values()) and "date_part" in none

    bs = _json(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=bs&scl=True", auth=ALICE))
    assert "hist" not in bs  # scl is forced off for S1
    _check_rows(bs, _expected(seed, 1, "bs"), seed)
    assert bs["band"] == ["VHb", "VVb"]
    c6 = _json(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=c6", auth=ALICE))
    assert c6["date_part"] == [] and "hist" not in c6

    scl = _json(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=scl", auth=ALICE))
    assert scl == {
        "obsid": [seed.scenes["apr"], seed.scenes["may"]],
        "hist": [{"4": 50, "8": 3, "10": 1}, {"4": 90, "9": 8}],
    }

    resp = client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=s2&tsformat=csv", auth=ALICE)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    assert resp.headers["content-disposition"].startswith("attachment;")
    table = list(csv.reader(io.StringIO(resp.text)))
    assert table[0] == ["date_part", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max", "hist"]
    rows = _expected(seed, 1, "s2")
    assert len(table) == 1 + len(rows)
    assert [float(r[0]) for r in table[1:]] == [seed.acquired[r[1]].timestamp() for r in rows]
    assert [r[1] for r in table[1:]] == [r[2] for r in rows]
    assert [float(r[3]) for r in table[1:]] == [r[4] for r in rows]
    assert json.loads(table[1][10]) == {"4": 50, "8": 3, "10": 1} and table[-1][10] == "{}"

    _error(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=nope&tstype=s2", auth=ALICE), 404, "not_found")


def test_ptype_tables(client: TestClient) -> None:
    g = _json(client.get("/query/parcelByID?aoi=ms&year=2024&pid=G-1&ptype=g", auth=ALICE))
    assert g["cropname"] == ["grass"] and g["area"] == [5000]
    ts = _json(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=G-1&ptype=g&scl=False", auth=ALICE))
    assert len(ts["date_part"]) == 6  # same pid space as the main parcel table
    _error(client.get("/query/parcelByID?aoi=ms&year=2024&pid=G-1&ptype=m", auth=ALICE), 404, "not_found")
    _error(client.get("/query/parcelByID?aoi=ms&year=2024&pid=G-1", auth=ALICE), 404, "not_found")


def test_info(client: TestClient) -> None:
    body = _json(client.get("/query/info", auth=ALICE))
    assert set(body) == {"server", "helpers", "aois"}
    assert body["server"]["title"] == "cbmflow"
    assert list(body["aois"]) == ["ms"]  # br exists but alice is not granted it
    ms = body["aois"]["ms"]
    assert ms["years"] == [2024] and ms["datasets"] == ["g"] and ms["time_series"] == ["s2", "bs"]
    assert ms["id_examples_2024"] == ["P-1", "P-2", "P-3", "P-4", "O'Neil; --"]
    assert ms["id_examples_2024_g"] == ["G-1"]
    assert ms["request_examples"]["parcelByID"].startswith(
        "http://testserver/query/parcelByID?aoi=ms&year=2024&pid=P-1"
    )
    assert set(_json(client.get("/query/info", auth=ROOT))["aois"]) == {"br", "ms"}
    assert _json(client.get("/query/info", auth=BOB))["aois"] == {}
    _error(client.get("/query/info?aoi=ms", auth=BOB), 403, "forbidden")
    _error(client.get("/query/info?aoi=xx", auth=BOB), 404, "not_found")


# ---------------------------------------------------------------- auth, tenancy, errors

DATASET_ROUTES = [
    "/query/parcelByID?aoi=ms&year=2024&pid=P-1",
    "/query/parcelByLocation?aoi=ms&year=2024&lon=10.0005&lat=52.0002",
    "/query/parcelsByPolygon?aoi=ms&year=2024&polygon=9.99_51.99-10.01_51.99-10.01_52.01-9.99_52.01",
    "/query/parcelPeers?aoi=ms&year=2024&pid=P-1",
    "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=s2",
    "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=scl&tsformat=csv",
    "/query/info?aoi=ms",
]


def test_authentication(client: TestClient) -> None:
    for url in [*DATASET_ROUTES, "/query/info"]:
        for auth in (None, ("alice", "wrong-password"), ("nobody", "whatever-1"), ("", ""), ("bad name!", "x")):
            resp = client.get(url, auth=auth)
            _error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == 'Basic realm="cbmflow"'
    for header in ("Bearer abc", "Basic !!!notbase64", "Basic bm9jb2xvbg==", "Basic"):  # last-but-one: "nocolon"
        resp = client.get("/query/info", headers={"Authorization": header})
        _error(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == 'Basic realm="cbmflow"'
    assert _json(client.get("/health")) == {"status": "ok"}


def test_cross_tenant_forbidden_on_every_dataset_route(client: TestClient) -> None:
    for url in DATASET_ROUTES:
        _error(client.get(url, auth=BOB), 403, "forbidden")
        ok = client.get(url, auth=ALICE)
        assert ok.status_code == 200, (url, ok.text)
        assert client.get(url, auth=ROOT).status_code == 200, url
    # alice is not granted br: 403 before the dataset is even looked up, also for unknown years
    _error(client.get("/query/parcelByID?aoi=br&year=2024&pid=B-1", auth=ALICE), 403, "forbidden")
    _error(client.get("/query/parcelByID?aoi=br&year=1999&pid=B-1", auth=ALICE), 403, "forbidden")


def test_not_found(client: TestClient) -> None:
    _error(client.get("/query/parcelByID?aoi=ms&year=2024&pid=P-404", auth=ALICE), 404, "not_found")
    _error(client.get("/query/parcelByID?aoi=ms&year=2023&pid=P-1", auth=ALICE), 404, "not_found")
    _error(client.get("/query/parcelByID?aoi=zz&year=2024&pid=P-1", auth=ROOT), 404, "not_found")
    _error(client.get("/query/parcelTimeSeries?aoi=ms&year=2030&pid=P-1", auth=ALICE), 404, "not_found")
    _error(client.get("/query/nothing", auth=ALICE), 404, "not_found")
    _error(client.get("/nothing-here", auth=ALICE), 404, "not_found")
    _error(client.post("/query/parcelByID?aoi=ms&year=2024&pid=P-1", auth=ALICE), 405, "method_not_allowed")


@pytest.mark.parametrize(
    "url",
    [
        "/query/parcelByID?aoi=ms&year=abc&pid=P-1",
        "/query/parcelByID?aoi=ms&year=&pid=P-1",
        "/query/parcelByID?aoi=ms&year=99999999999999999999&pid=P-1",
        "/query/parcelByID?aoi=ms&pid=P-1",
        "/query/parcelByID?year=2024&pid=P-1",
        "/query/parcelByID?aoi=ms&year=2024",
        "/query/parcelByID?aoi=ms&year=2024&pid=",
        "/query/parcelByID?aoi=ms&year=2024&pid=" + "x" * 101,
        "/query/parcelByID?aoi=ms&year=2024&pid=P-1&pid=P-2",
        "/query/parcelByID?aoi=ms&year=2024&pid=P%001",
        "/query/parcelByID?aoi=ms&year=2024&pid=P-1&withGeometry=yes",
        "/query/parcelByID?aoi=ms&year=2024&pid=P-1&ptype=toolong",
        "/query/parcelByLocation?aoi=ms&year=2024&lon=999&lat=52",
        "/query/parcelByLocation?aoi=ms&year=2024&lon=10&lat=-91",
        "/query/parcelByLocation?aoi=ms&year=2024&lon=nan&lat=52",
        "/query/parcelByLocation?aoi=ms&year=2024&lon=inf&lat=52",
        "/query/parcelByLocation?aoi=ms&year=2024&lat=52",
        "/query/parcelPeers?aoi=ms&year=2024&pid=P-1&distance=-1",
        "/query/parcelPeers?aoi=ms&year=2024&pid=P-1&distance=1e9",
        "/query/parcelPeers?aoi=ms&year=2024&pid=P-1&max=ten",
        "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=zz",
        "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=c1",
        "/query/parcelTimeSeries?aoi=ms&year=2024&tstype=s2",
        "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tsformat=xml",
        "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&scl=maybe",
        "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&band=B0 4",
    ],
)
def test_bad_parameters(client: TestClient, url: str) -> None:
    _error(client.get(url, auth=ALICE), 400, "invalid_input")


INJECTIONS = [
    "' OR 1=1 --",
    "1; DROP TABLE users",
    "x' UNION SELECT name, password_hash, null, null, null, null, null FROM users --",
    "ms; DROP SCHEMA ms CASCADE",
    "1) OR (1=1",
    '"; DELETE FROM scenes; --',
]


def test_injection_is_rejected_and_harmless(client: TestClient, seed: Seed) -> None:
    before = {
        q: _db_value(seed.dsn, q)
        for q in (
            "SELECT count(*) FROM users",
            "SELECT count(*) FROM user_grants",
            "SELECT count(*) FROM scenes",
            "SELECT count(*) FROM datasets",
            "SELECT count(*) FROM ms.parcels_2024",
            "SELECT count(*) FROM ms.sigs_2024",
            "SELECT count(*) FROM ms.hists_2024",
        )
    }
    for evil in INJECTIONS:
        for url, params in (
            ("/query/parcelByID", {"aoi": "ms", "year": "2024", "pid": evil}),
            ("/query/parcelByID", {"aoi": evil, "year": "2024", "pid": "P-1"}),
            ("/query/parcelByID", {"aoi": "ms", "year": evil, "pid": "P-1"}),
            ("/query/parcelByID", {"aoi": "ms", "year": "2024", "pid": "P-1", "ptype": evil}),
            ("/query/parcelByLocation", {"aoi": "ms", "year": "2024", "lon": evil, "lat": "52"}),
            ("/query/parcelsByPolygon", {"aoi": "ms", "year": "2024", "polygon": evil}),
            ("/query/parcelsByPolygon", {"aoi": "ms", "year": "2024", "wkt": evil}),
            ("/query/parcelsByPolygon", {"aoi": "ms", "year": "2024", "geojson": evil}),
            ("/query/parcelPeers", {"aoi": "ms", "year": "2024", "pid": evil}),
            ("/query/parcelPeers", {"aoi": "ms", "year": "2024", "pid": "P-1", "distance": evil}),
            ("/query/parcelTimeSeries", {"aoi": "ms", "year": "2024", "pid": evil}),
            ("/query/parcelTimeSeries", {"aoi": "ms", "year": "2024", "pid": "P-1", "band": evil}),
            ("/query/parcelTimeSeries", {"aoi": "ms", "year": "2024", "pid": "P-1", "tstype": evil}),
            ("/query/parcelTimeSeries", {"aoi": "ms", "year": "2024", "pid": "P-1", "ptype": evil}),
            ("/query/info", {"aoi": evil}),
        ):
            for auth in (ALICE, ROOT):
                resp = client.get(url, params=params, auth=auth)
                assert 400 <= resp.status_code < 500, (url, params, resp.status_code, resp.text)
                body = _json(resp, resp.status_code)
                assert "error" in body and "argon2" not in resp.text
        resp = client.get("/query/info", auth=(evil.replace(":", ""), evil))
        _error(resp, 401, "unauthorized")
    after = {q: _db_value(seed.dsn, q) for q in before}
    assert after == before
    assert _db_value(seed.dsn, "SELECT count(*) FROM users WHERE password_hash LIKE '$argon2id$%'") == 3


def test_unexpected_errors_are_generic_json_500(seed: Seed) -> None:
    with TestClient(create_app(seed.dsn), raise_server_exceptions=False) as client:
        assert client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1", auth=ALICE).status_code == 200
        with db.transaction(seed.dsn) as cur:
            # an operator mistake, not the user's: a table the series reads (sql/011's band lists)
            cur.execute("DROP TABLE ms.sigs_2024_bands CASCADE")
        resp = client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1", auth=ALICE)
        err = _error(resp, 500, "internal_error")
        assert err["message"] == "internal server error" and "sigs" not in resp.text


def test_fractional_statement_timeout_reaches_postgresql(seed: Seed) -> None:
    """0.5 s is 500 ms on every pooled session (it was truncated to 0, "no timeout"), and a slower
    query is cancelled and answered as a timeout."""
    app = create_app(seed.dsn, ApiSettings(statement_timeout_s=0.5))
    with TestClient(app):
        with app.state.cbmflow.pool.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "500ms"
            started = time.monotonic()
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(2)")
            assert time.monotonic() - started < 1.5


def test_api_cannot_write(seed: Seed) -> None:
    """The pool's connections are read-only: defence in depth behind the bound parameters."""
    app = create_app(seed.dsn)
    with TestClient(app):
        with app.state.cbmflow.pool.cursor() as cur:
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                cur.execute("DELETE FROM users")


@pytest.fixture
def verify_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords argon2 is asked to verify, in order (the real verification still runs)."""
    calls: list[str] = []
    real_verify = api.auth.verify

    def counting_verify(password_hash: str, password: str) -> bool:
        calls.append(password)
        return real_verify(password_hash, password)

    monkeypatch.setattr(api.auth, "verify", counting_verify)
    return calls


def test_auth_cache_and_immediate_revocation(client: TestClient, seed: Seed, verify_calls: list[str]) -> None:
    calls = verify_calls
    url = "/query/parcelByID?aoi=ms&year=2024&pid=P-1"
    for _ in range(3):
        assert client.get(url, auth=ALICE).status_code == 200
    assert len(calls) <= 1, "a verified pair must be served from the cache"
    # the cache never holds the plain password
    entries = client.app.state.cbmflow.auth._entries  # type: ignore[attr-defined]
    assert entries and all(ALICE[1] not in repr(k) + repr(v) for k, v in entries.items())

    with db.transaction(seed.dsn) as cur:
        cur.execute("DELETE FROM user_grants WHERE user_name = 'alice'")
    _error(client.get(url, auth=ALICE), 403, "forbidden")  # revocation is not cached
    with db.transaction(seed.dsn) as cur:
        cur.execute("UPDATE users SET password_hash = %s WHERE name = 'alice'", (_hash("another-pass"),))
    _error(client.get(url, auth=ALICE), 401, "unauthorized")  # a password change voids the cache
    with db.transaction(seed.dsn) as cur:
        cur.execute("DELETE FROM users WHERE name = 'root'")
    _error(client.get(url, auth=ROOT), 401, "unauthorized")


def test_concurrent_cold_logins_verify_once(verify_calls: list[str]) -> None:
    """Many connections arriving at once with the same credentials cost one argon2 verification."""
    from concurrent.futures import ThreadPoolExecutor

    calls = verify_calls
    auth = api.auth.Authenticator(cache_s=300)
    row = ("alice", _hash("alice-pass-1"), False, ["ms"])
    with ThreadPoolExecutor(16) as pool:
        users = list(pool.map(lambda _: auth.check_password("alice", "alice-pass-1", row), range(32)))
    assert {u.name for u in users} == {"alice"}
    assert len(calls) == 1
    assert not auth._inflight  # every waiter left
    calls.clear()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(auth.check_password, "alice", "wrong-pass", row) for _ in range(4)]
    assert all(isinstance(f.exception(), api.auth.AuthenticationError) for f in futures)
    assert len(calls) == 4, "a failure is never cached: each wrong attempt is verified"


def test_prepared_series_survives_table_changes(seed: Seed) -> None:
    """The route runs a server-side prepared statement per pooled connection; a table dropped and
    recreated under the same name (a re-import) must still be read, not fail or serve stale rows."""
    url = "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=s2"
    with TestClient(create_app(seed.dsn)) as client:
        before = client.get(url, auth=ALICE).json()
        assert before["band"]
        state = client.app.state.cbmflow  # type: ignore[attr-defined]
        assert client.get(url, auth=ALICE).json() == before  # the first request verified the password
        assert any(conn.prepared for conn in state.aio._idle), "served by the event-loop path, prepared"
        with db.transaction(seed.dsn) as cur:
            # the series reads sql/011's compact table directly; its mean is slot 2 of 8 per band
            cur.execute("CREATE TABLE ms.obs_copy AS SELECT * FROM ms.sigs_2024_obs")
            cur.execute(
                "UPDATE ms.obs_copy SET stats = (SELECT array_agg(CASE WHEN j % 8 = 2 THEN v + 1000 ELSE v END"
                " ORDER BY j) FROM unnest(stats) WITH ORDINALITY u(v, j))"
            )
            cur.execute("DROP TABLE ms.sigs_2024_obs CASCADE")  # and the views over it
            cur.execute("ALTER TABLE ms.obs_copy RENAME TO sigs_2024_obs")
        after = client.get(url, auth=ALICE).json()
        assert after["band"] == before["band"]
        assert after["mean"] == [m + 1000 for m in before["mean"]]


# ---------------------------------------------------------------- CLI and a real server


def test_users_cli(seed: Seed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBMFLOW_DB_DSN", seed.dsn)
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    res = runner.invoke(app, ["users", "add", "carol", "--datasets", "ms,br"], input="carol-secret-9\n")
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["users", "add", "carol", "--datasets", "ms"], input="carol-secret-9\n")
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(app, ["users", "add", "dave", "--datasets", "ms"], input="short\n")
    assert res.exit_code == 1
    res = runner.invoke(app, ["users", "add", "eve", "--datasets", "M S!"], input="eve-secret-99\n")
    assert res.exit_code == 1
    res = runner.invoke(app, ["users", "add", "admin2", "--admin"], input="admin2-secret\n")
    assert res.exit_code == 0, res.output

    with TestClient(create_app(seed.dsn)) as client:
        carol = ("carol", "carol-secret-9")
        assert client.get("/query/parcelByID?aoi=br&year=2024&pid=B-1", auth=carol).status_code == 200
        res = runner.invoke(app, ["users", "revoke", "carol", "br"])
        assert res.exit_code == 0, res.output
        _error(client.get("/query/parcelByID?aoi=br&year=2024&pid=B-1", auth=carol), 403, "forbidden")
        res = runner.invoke(app, ["users", "grant", "carol", "br"])
        assert res.exit_code == 0, res.output
        assert client.get("/query/parcelByID?aoi=br&year=2024&pid=B-1", auth=carol).status_code == 200
        assert (
            client.get("/query/parcelByID?aoi=br&year=2024&pid=B-1", auth=("admin2", "admin2-secret")).status_code
            == 200
        )
        res = runner.invoke(app, ["users", "passwd", "carol"], input="carol-new-pass\n")
        assert res.exit_code == 0, res.output
        _error(client.get("/query/info", auth=carol), 401, "unauthorized")
        assert client.get("/query/info", auth=("carol", "carol-new-pass")).status_code == 200

    res = runner.invoke(app, ["users", "list"])
    assert res.exit_code == 0
    assert "carol" in res.output and "br, ms" in res.output and "admin2" in res.output
    assert runner.invoke(app, ["users", "grant", "nobody", "ms"]).exit_code == 1
    assert runner.invoke(app, ["users", "grant", "carol", "X'; DROP"]).exit_code == 1
    assert runner.invoke(app, ["users", "delete", "carol"]).exit_code == 0
    assert runner.invoke(app, ["users", "delete", "carol"]).exit_code == 1
    assert _db_value(seed.dsn, "SELECT count(*) FROM user_grants WHERE user_name = 'carol'") == 0
    stored = _db_value(seed.dsn, "SELECT password_hash FROM users WHERE name = 'admin2'")
    assert stored.startswith("$argon2id$") and verify(stored, "admin2-secret")


def test_real_uvicorn_server(seed: Seed) -> None:
    port = free_port()
    env = {**os.environ, "CBMFLOW_DB_DSN": seed.dsn, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from api.server import serve; serve('127.0.0.1', {port}, 1)"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.2)
        resp = requests.get(f"{base}/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=s2", auth=ALICE, timeout=10)
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        assert resp.json()["band"] == ["B04", "B08"] * 3
        denied = requests.get(f"{base}/query/parcelByID?aoi=ms&year=2024&pid=P-1", timeout=10)
        assert denied.status_code == 401 and denied.headers["WWW-Authenticate"] == 'Basic realm="cbmflow"'
        assert denied.json()["error"]["code"] == "unauthorized"
        forbidden = requests.get(f"{base}/query/parcelByID?aoi=ms&year=2024&pid=P-1", auth=BOB, timeout=10)
        assert forbidden.status_code == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}" in out
    # uvicorn re-raises SIGTERM after a graceful shutdown; the lifespan must have closed the pool
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "api.stopped" in out and "Application shutdown complete" in out, out


def test_parcels_by_polygon_large_areas(client: TestClient) -> None:
    """A few vertices spanning half the globe must still mean the lon/lat area that was drawn."""
    every = ["P-1", "P-2", "P-3", "P-4", "O'Neil; --"]
    quarter = {"aoi": "ms", "year": 2024, "polygon": "0_0-180_0-180_90-0_90"}
    assert _json(client.get("/query/parcelsByPolygon", params=quarter, auth=ROOT)) == {"pid": every}
    world = "POLYGON((-180 -90, 180 -90, 180 90, -180 90, -180 -90))"
    assert _json(
        client.get("/query/parcelsByPolygon", params={"aoi": "ms", "year": 2024, "wkt": world}, auth=ROOT)
    ) == {"pid": every}
    assert _json(
        client.get("/query/parcelsByPolygon", params={"aoi": "br", "year": 2024, "wkt": world}, auth=ROOT)
    ) == {"pid": ["B-1"]}
    west = "POLYGON((-180 -90, 9.9999 -90, 9.9999 90, -180 90, -180 -90))"  # west of 10°E: only the odd one
    assert _json(client.get("/query/parcelsByPolygon", params={"aoi": "ms", "year": 2024, "wkt": west}, auth=ROOT)) == {
        "pid": ["O'Neil; --"]
    }


def test_lost_connections_are_retried_then_503(seed: Seed) -> None:
    url = "/query/parcelByID?aoi=ms&year=2024&pid=P-1"
    dbname = seed.dsn.rsplit("/", 1)[1]
    admin = psycopg2.connect(seed.dsn.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    try:
        with TestClient(create_app(seed.dsn)) as client, admin.cursor() as cur:
            series = "/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=s2"
            assert client.get(url, auth=ALICE).status_code == 200
            expected = client.get(series, auth=ALICE).json()
            assert client.get(series, auth=ALICE).json() == expected  # now on the event-loop path
            kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'cbmflow-api'"
            cur.execute(kill)
            assert client.get(url, auth=ALICE).status_code == 200  # stale pooled connection replaced
            cur.execute(kill)
            assert client.get(series, auth=ALICE).json() == expected  # both pools' connections replaced
            assert client.get(series, auth=ALICE).json() == expected
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            cur.execute(kill)
            err = _error(client.get(url, auth=ALICE), 503, "unavailable")
            assert "retry" in err["message"]
            _error(client.get(series, auth=ALICE), 503, "unavailable")
            _error(client.get("/health"), 503, "unavailable")
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            assert client.get(url, auth=ALICE).status_code == 200
    finally:
        admin.close()
