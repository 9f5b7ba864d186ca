"""Coherence in the series: JRC ``tstype=c6`` serves the 6-day observations as before, and
``/api/v1/.../timeseries`` serves ``c6``, ``c12`` or both (``card=coh``) with each observation's
``gap_days``. The seed of tests/integration/test_api.py plus one 6-day and one 12-day coherence
scene with rows for parcel P-1, written here with known values."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from starlette.testclient import TestClient
from test_api import ALICE, _json, _seed

from api.app import create_app
from cbmflow import db
from cbmflow.settings import ApiSettings

BASE = "/api/v1/datasets/ms/2024"
COH = [  # card, acquired, (VVc mean, VHc mean)
    ("c12", datetime(2024, 4, 20, 5, 40, 0, tzinfo=UTC), (0.61, 0.42)),
    ("c6", datetime(2024, 4, 26, 5, 40, 0, tzinfo=UTC), (0.83, 0.55)),
]


def test_coherence_series_carry_their_gap_and_jrc_c6_keeps_working(pg_dsn: str) -> None:
    _seed(pg_dsn)
    ids: dict[str, int] = {}
    with db.transaction(pg_dsn) as cur:
        for card, acquired, means in COH:
            cur.execute(
                "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint,"
                " location, status) VALUES (%s, %s, 'S1A', 'C-SAR', %s, %s,"
                " ST_Multi(ST_MakeEnvelope(9, 51, 11, 53, 4326)), '/nowhere', 'extracted') RETURNING id",
                (f"id-{card}", f"S1A_X_09UWT_COH{card[1:]}", card, acquired),
            )
            ids[card] = cur.fetchone()[0]
            for band, mean in zip(("VVc", "VHc"), means, strict=True):
                cur.execute(
                    "INSERT INTO ms.sigs_2024 (pid, scene_id, band, count, mean, std, min, max, p25, p50, p75)"
                    " VALUES (1, %s, %s, 40, %s, 0.1, 0.2, 0.9, 0.5, 0.6, 0.7)",
                    (ids[card], band, mean),
                )
    with TestClient(create_app(db.role_dsn(pg_dsn, "api"), ApiSettings(auth_cache_s=300))) as client:
        jrc = _json(client.get("/query/parcelTimeSeries?aoi=ms&year=2024&pid=P-1&tstype=c6", auth=ALICE))
        assert jrc["band"] == ["VHc", "VVc"] and jrc["mean"] == [0.55, 0.83], "tstype=c6: the 6-day scene only"

        def series(card: str) -> list[dict[str, object]]:
            body = _json(client.get(f"{BASE}/timeseries", params={"pid": "P-1", "card": card}, auth=ALICE))
            assert body["card"] == card
            obs: list[dict[str, object]] = body["observations"]
            return obs

        both = series("coh")
        assert [(o["scene_id"], o["band"], o["mean"], o["gap_days"]) for o in both] == [
            (ids["c12"], "VHc", 0.42, 12),
            (ids["c12"], "VVc", 0.61, 12),
            (ids["c6"], "VHc", 0.55, 6),
            (ids["c6"], "VVc", 0.83, 6),
        ]
        assert [o["gap_days"] for o in series("c12")] == [12, 12]
        assert [(o["mean"], o["gap_days"]) for o in series("c6")] == [(0.55, 6), (0.83, 6)]
        assert all("gap_days" not in o for o in series("bs")) and series("bs")
        resp = client.get(f"{BASE}/timeseries", params={"pid": "P-1", "card": "coh", "format": "csv"}, auth=ALICE)
        table = list(csv.DictReader(io.StringIO(resp.text)))
        assert [r["gap_days"] for r in table] == ["12", "12", "6", "6"]
        scenes = _json(client.get("/api/v1/scenes", params={"card": "c12"}, auth=ALICE))
        assert [s["id"] for s in scenes["scenes"]] == [ids["c12"]]
