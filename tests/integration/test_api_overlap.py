"""The API returns one observation per acquisition where Sentinel-2 granules overlap.

Parcels either side of the UTM 32/33 boundary (12° E) are observed on one date by a zone-32 and a
zone-33 tile (two scenes of one datatake). The winners are written out by hand from the rule
(docs/watcher.md "Overlapping granules"): more pixels, then the parcel's own UTM zone; each
scene has its own means and SCL histogram, so the values tell which scene a route served.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg2 import sql
from starlette.testclient import TestClient
from test_api import ALICE, _hash, _json

from api.app import create_app
from cbmflow import db
from cbmflow.settings import ApiSettings

T32 = datetime(2024, 6, 3, 10, 20, 21, tzinfo=UTC)
T33 = datetime(2024, 6, 3, 10, 20, 33, tzinfo=UTC)  # same datatake, a later granule
LATER = datetime(2024, 6, 8, 10, 20, 21, tzinfo=UTC)
SCENES = {
    # label: (product name, acquired)
    "t32": ("S2B_MSIL2A_20240603T102021_N0510_R065_T32UQU_20240603T132211", T32),
    "t33": ("S2B_MSIL2A_20240603T102021_N0510_R065_T33UUP_20240603T132211", T33),
    "later": ("S2B_MSIL2A_20240608T102021_N0510_R065_T32UQU_20240608T132211", LATER),
}
PARCELS = {
    # parcel_id: (pid, longitude, {scene label: pixel count})
    "TIE-32": (1, 11.95, {"t32": 100, "t33": 100, "later": 100}),  # tie, parcel in zone 32
    "TIE-33": (2, 12.05, {"t32": 100, "t33": 100}),  # tie, parcel in zone 33
    "MORE-33": (3, 11.90, {"t32": 50, "t33": 80}),  # zone 32, but the zone-33 tile sees more
    "ONLY-32": (4, 12.10, {"t32": 90}),  # one tile only: unaffected
}
WINNERS = {  # parcel_id: the scene labels of its observations, by hand
    "TIE-32": ["t32", "later"],
    "TIE-33": ["t33"],
    "MORE-33": ["t33"],
    "ONLY-32": ["t32"],
}
MEAN = {  # (scene label, band) → mean, the same for every parcel
    ("t32", "B04"): 0.1,
    ("t32", "B08"): 0.5,
    ("t33", "B04"): 0.2,
    ("t33", "B08"): 0.3,
    ("later", "B04"): 0.05,
    ("later", "B08"): 0.45,
}
HIST = {  # scene label → SCL histogram of every parcel it sees (class → pixels); t33 is cloudy
    "t32": {"4": 95, "8": 5},
    "t33": {"4": 40, "9": 60},
    "later": {"4": 100},
}
MASK = (3, 8, 9, 10)  # the default SCL mask of /api/v1 .../index


@pytest.fixture
def world(pg_dsn: str) -> dict[str, int]:
    ids: dict[str, int] = {}
    with db.transaction(pg_dsn) as cur:
        cur.execute("INSERT INTO aois (name, geom) VALUES ('ov', ST_Multi(ST_MakeEnvelope(11, 47, 13, 49, 4326)))")
        ds = db.ensure_dataset(cur, "ov", 2024, 3035)
        for label, (name, acquired) in SCENES.items():
            cur.execute(
                "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint,"
                " location, status) VALUES (%s, %s, 'S2B', 'MSIL2A', 's2', %s,"
                " ST_Multi(ST_MakeEnvelope(10, 47, 14, 49, 4326)), '/nowhere', 'extracted') RETURNING id",
                (name, name, acquired),
            )
            ids[label] = cur.fetchone()[0]
        for parcel_id, (pid, lon, counts) in PARCELS.items():
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (pid, parcel_id, crop_code, crop_name, geom) VALUES (%s, %s, '1', 'wheat',"
                    " ST_Multi(ST_Transform(ST_Buffer(ST_SetSRID(ST_MakePoint(%s, 48.0), 4326), 0.0005), 3035)))"
                ).format(ds.parcels),
                (pid, parcel_id, lon),
            )
            for label, count in counts.items():
                for band in ("B04", "B08"):
                    cur.execute(
                        sql.SQL(
                            "INSERT INTO {} (pid, scene_id, band, count, mean, std, min, max, p25, p50, p75)"
                            " VALUES (%s, %s, %s, %s, %s, 0, 0, 1, 0, 0, 0)"
                        ).format(ds.sigs),
                        (pid, ids[label], band, count, MEAN[(label, band)]),
                    )
                for cls, n in HIST[label].items():
                    cur.execute(
                        sql.SQL("INSERT INTO {} (pid, scene_id, class, count) VALUES (%s, %s, %s, %s)").format(
                            ds.hists
                        ),
                        (pid, ids[label], int(cls), n),
                    )
        cur.execute(
            "INSERT INTO users (name, password_hash, is_admin) VALUES (%s, %s, false)", (ALICE[0], _hash(ALICE[1]))
        )
        cur.execute("INSERT INTO user_grants (user_name, aoi) VALUES (%s, 'ov')", (ALICE[0],))
    return ids


@pytest.fixture
def client(pg_dsn: str, world: dict[str, int]) -> Iterator[TestClient]:
    with TestClient(create_app(db.role_dsn(pg_dsn, "api"), ApiSettings(auth_cache_s=300))) as c:
        yield c


def _winner_rows(parcel_id: str) -> list[tuple[str, str]]:
    return [(label, band) for label in WINNERS[parcel_id] for band in ("B04", "B08")]


def test_jrc_series_one_observation_per_date_and_band(client: TestClient, world: dict[str, int]) -> None:
    for parcel_id in PARCELS:
        _check_jrc(client, world, parcel_id)


def _check_jrc(client: TestClient, world: dict[str, int], parcel_id: str) -> None:
    body = _json(
        client.get(
            "/query/parcelTimeSeries",
            params={"aoi": "ov", "year": 2024, "pid": parcel_id, "tstype": "s2", "scl": "True", "ref": "True"},
            auth=ALICE,
        )
    )
    want = _winner_rows(parcel_id)
    days = [datetime.fromtimestamp(t, UTC).date() for t in body["date_part"]]
    assert len(set(zip(days, body["band"], strict=True))) == len(days) == len(want)
    assert body["reference"] == [SCENES[label][0] for label, _ in want]
    assert body["date_part"] == [SCENES[label][1].timestamp() for label, _ in want]
    assert body["band"] == [band for _, band in want]
    assert body["mean"] == [MEAN[row] for row in want]
    assert body["count"] == [PARCELS[parcel_id][2][label] for label, _ in want]
    assert body["hist"] == [HIST[label] for label, _ in want]  # the SCL of the chosen scene

    scl = _json(
        client.get(
            "/query/parcelTimeSeries", params={"aoi": "ov", "year": 2024, "pid": parcel_id, "tstype": "scl"}, auth=ALICE
        )
    )
    assert scl["obsid"] == [world[label] for label in WINNERS[parcel_id]]
    assert scl["hist"] == [HIST[label] for label in WINNERS[parcel_id]]


def test_v1_series_and_index_follow_the_rule(client: TestClient, world: dict[str, int]) -> None:
    for parcel_id in PARCELS:
        _check_v1(client, world, parcel_id)


def _check_v1(client: TestClient, world: dict[str, int], parcel_id: str) -> None:
    base = "/api/v1/datasets/ov/2024"
    obs = _json(client.get(f"{base}/timeseries", params={"pid": parcel_id}, auth=ALICE))["observations"]
    want = _winner_rows(parcel_id)
    assert [(o["scene_id"], o["band"]) for o in obs] == [(world[label], band) for label, band in want]
    assert [o["mean"] for o in obs] == [MEAN[row] for row in want]

    index: Any = _json(client.get(f"{base}/index", params={"pid": parcel_id, "max_cloud": "1"}, auth=ALICE))
    got = index["observations"]
    assert [o["scene_id"] for o in got] == [world[label] for label in WINNERS[parcel_id]]
    for o, label in zip(got, WINNERS[parcel_id], strict=True):
        nir, red = MEAN[(label, "B08")], MEAN[(label, "B04")]
        assert o["value"] == pytest.approx((nir - red) / (nir + red))
        hist = HIST[label]
        masked = sum(n for cls, n in hist.items() if int(cls) in MASK)
        assert o["cloud"] == pytest.approx(masked / sum(hist.values()))
    # The default cloud filter judges the chosen scene: a cloudy losing tile does not drop a clear
    # observation, and a cloudy chosen tile is dropped, not replaced by the other tile.
    clear = _json(client.get(f"{base}/index", params={"pid": parcel_id}, auth=ALICE))
    assert [o["scene_id"] for o in clear["observations"]] == [
        world[label] for label in WINNERS[parcel_id] if label != "t33"
    ]
    assert clear["dropped"] == WINNERS[parcel_id].count("t33")
