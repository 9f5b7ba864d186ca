"""The real JRC client, ``cbm==0.0.18`` from PyPI, unchanged, against a running cbmflow API.

The client is installed into its own virtualenv (cached in the pytest cache, so only the first
run pays the ~30-45 s install) and driven by a script in a scratch directory, because it reads
``./config/main.json`` and creates ``./temp`` relative to the working directory. Its import-time
PyPI version check is pointed at a closed local port so the test never depends on the internet.
Every value the client returns is compared with the database, not with the API's own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_api import ALICE, Seed, _seed

from cbmflow import db
from cbmflow.dev.api_process import api_server

CBM_VERSION = "0.0.18"

CLIENT_SCRIPT = r"""
import json, sys
import cbm
cbm.set_api_account(sys.argv[1], sys.argv[2], sys.argv[3])
out = {
    "by_pid": cbm.get.parcel_info.by_pid("ms", 2024, "P-1"),
    "by_location": cbm.get.parcel_info.by_location("ms", 2024, 10.0005, 52.0002),
    "ts_s2": cbm.get.time_series.by_pid("ms", 2024, "P-1", tstype="s2"),
    "ts_s2_b4": cbm.get.time_series.by_pid("ms", 2024, "P-1", tstype="s2", band="B4"),
    "ts_bs": cbm.get.time_series.by_pid("ms", 2024, "P-1", tstype="bs"),
    "peers": cbm.get.parcels_list.peers("ms", 2024, "P-1", distance=5000, maxPeers=10),
    "unknown": cbm.get.parcel_info.by_pid("ms", 2024, "P-404"),
}
print("CBM-RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="session")
def cbm_python(request: pytest.FixtureRequest) -> Path:
    """The python of a virtualenv holding cbm==0.0.18 (+ setuptools, for its pkg_resources import)."""
    root = Path(request.config.cache.mkdir(f"cbm-client-{CBM_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"))
    python = root / "bin" / "python"
    marker = root / ".installed"
    if not marker.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"cbm=={CBM_VERSION}", "setuptools<81"],
            check=True,
            timeout=600,
        )
        marker.touch()
    return python


@pytest.fixture
def server(seed: Seed) -> Iterator[str]:
    with api_server(seed.dsn) as base:
        yield base


@pytest.fixture
def seed(pg_dsn: str) -> Seed:
    return _seed(pg_dsn)


def _run_client(python: Path, base: str, auth: tuple[str, str], cwd: Path) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        # the import-time GET https://pypi.org/... fails at once instead of reaching the internet
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "MPLBACKEND": "Agg",
    }
    res = subprocess.run(
        [str(python), "-c", CLIENT_SCRIPT, base, *auth],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("CBM-RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("CBM-RESULT "))
    return result


def _db_rows(dsn: str, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with db.transaction(dsn) as cur:
        cur.execute(query, args)
        return list(cur.fetchall())


def _db_series(dsn: str, card: str, bands: tuple[str, ...] | None = None) -> list[tuple[Any, ...]]:
    return _db_rows(
        dsn,
        "SELECT extract(epoch FROM s.acquired_at)::float8, g.band, g.count, g.mean, g.std, g.min, g.p25, g.p50,"
        " g.p75, g.max FROM ms.sigs_2024 g JOIN scenes s ON s.id = g.scene_id JOIN ms.parcels_2024 p ON p.pid = g.pid"
        " WHERE p.parcel_id = 'P-1' AND s.card = %s AND (%s::text[] IS NULL OR g.band = ANY(%s))"
        " ORDER BY s.acquired_at, g.band",
        (card, list(bands) if bands else None, list(bands) if bands else None),
    )


def _columns(rows: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    names = ("date_part", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max")
    return {n: [r[i] for r in rows] for i, n in enumerate(names)}


def test_jrc_client_unchanged(cbm_python: Path, server: str, seed: Seed, tmp_path: Path) -> None:
    out = _run_client(cbm_python, server, ALICE, tmp_path)

    (pid, crop, code, area, clon, clat, geom) = _db_rows(
        seed.dsn,
        "SELECT parcel_id, crop_name, crop_code, ST_Area(ST_Transform(geom, 3035))::bigint,"
        " ST_X(ST_Transform(ST_Centroid(geom), 4326)), ST_Y(ST_Transform(ST_Centroid(geom), 4326)),"
        " ST_AsGeoJSON(geom) FROM ms.parcels_2024 WHERE parcel_id = 'P-1'",
    )[0]
    info = out["by_pid"]
    assert info["pid"] == [pid] and info["cropname"] == [crop] and info["cropcode"] == [code]
    assert info["area"] == [area] and info["clon"] == [clon] and info["clat"] == [clat]
    assert json.loads(info["geom"][0]) == json.loads(geom)  # the client asks withGeometry=True
    assert out["by_location"]["pid"] == [pid] and out["by_location"]["area"] == [area]
    assert out["unknown"] is None  # the client maps a non-parcel reply to None
    # the client saved what it got where its notebooks look for it
    saved = json.loads((tmp_path / "temp" / "ms" / "2024" / "P-1" / "info.json").read_text())
    assert saved["pid"] == [pid]

    for key, card, bands in (("ts_s2", "s2", None), ("ts_s2_b4", "s2", ("B04",)), ("ts_bs", "bs", None)):
        expect = _columns(_db_series(seed.dsn, card, bands))
        got = out[key]
        assert expect["date_part"], key
        for name, values in expect.items():
            assert got[name] == values, (key, name)
    hists = _db_rows(
        seed.dsn,
        "SELECT s.acquired_at, json_object_agg(h.class::text, h.count ORDER BY h.class) FROM ms.hists_2024 h"
        " JOIN scenes s ON s.id = h.scene_id WHERE h.pid = 1 GROUP BY s.acquired_at",
    )
    by_time = {t.timestamp(): h for t, h in hists}
    assert out["ts_s2"]["hist"] == [by_time.get(t, {}) for t in out["ts_s2"]["date_part"]]
    assert (tmp_path / "temp" / "ms" / "2024" / "P-1" / "time_series_s2.csv").exists()

    peers = _db_rows(
        seed.dsn,
        "SELECT p.parcel_id, ST_Distance(ST_Transform(p.geom, 3035), ST_Transform(q.geom, 3035))"
        " FROM ms.parcels_2024 p, ms.parcels_2024 q WHERE q.parcel_id = 'P-1' AND p.parcel_id <> 'P-1'"
        " AND p.crop_name = q.crop_name AND ST_DWithin(ST_Transform(p.geom, 3035), ST_Transform(q.geom, 3035), 5000)"
        " ORDER BY 2, 1",
    )
    assert out["peers"] == {"pids": [r[0] for r in peers], "distance": [r[1] for r in peers]}


def test_jrc_client_with_api_token(cbm_python: Path, server: str, seed: Seed, tmp_path: Path) -> None:
    """A token works as the Basic password of the unchanged client; a revoked one stops working."""
    from api import users

    with db.transaction(seed.dsn) as cur:
        token = users.create_token(cur, "alice")
    out = _run_client(cbm_python, server, ("alice", token), tmp_path)
    assert out["by_pid"]["pid"] == ["P-1"]
    with db.transaction(seed.dsn) as cur:
        assert users.revoke_token(cur, "alice", token[5:17])
    denied = requests.get(f"{server}/query/info", auth=("alice", token), timeout=10)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
