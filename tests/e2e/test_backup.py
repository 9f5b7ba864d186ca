"""``cbmflow db backup`` / ``db restore`` on real servers: a small world is extracted by a real
worker, backed up with the CLI, restored into a fresh database, and the API must answer exactly
as it did before; the restored database needs no migration. The comparison is between the API's
answers on two databases, and the restored rows are also checked against the generator's truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql
from starlette.testclient import TestClient

from api.app import create_app
from api.users import upsert_user
from card.testworld import generate
from catalog_watcher.service import watch_once
from cbmflow import db
from cbmflow.dev.verify import verify_truth
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import ApiSettings, WatchSettings

CBMFLOW = str(Path(sys.executable).parent / "cbmflow")
USER = ("backup-user", "backup-password-1")


@pytest.fixture
def fresh_db(stack: Any) -> Iterator[str]:
    """An empty database (no migrations, no PostGIS) on the session's server."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(stack.pg.dsn_for("postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield stack.pg.dsn_for(name)
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CBMFLOW, "db", *args], env={**os.environ, "CBMFLOW_DB_DSN": dsn}, capture_output=True, text=True, timeout=180
    )


def _answers(dsn: str, pids: list[str]) -> dict[str, Any]:
    """What a client sees: legacy and /api/v1 series for a few parcels, datasets and scenes."""
    out: dict[str, Any] = {}
    with TestClient(create_app(dsn, ApiSettings())) as client:
        urls = ["/api/v1/datasets", "/api/v1/scenes"]
        for pid in pids:
            urls += [
                f"/query/parcelTimeSeries?aoi=ms&year=2024&pid={pid}&tstype=s2",
                f"/query/parcelTimeSeries?aoi=ms&year=2024&pid={pid}&tstype=scl",
                f"/api/v1/datasets/ms/2024/timeseries?pid={pid}",
                f"/api/v1/datasets/ms/2024/parcel?pid={pid}",
            ]
        for url in urls:
            resp = client.get(url, auth=USER)
            assert resp.status_code == 200, (url, resp.text)
            out[url] = resp.json()
    return out


def test_backup_restore_into_a_fresh_database_answers_the_same(
    cbm_env: Any, pg_dsn: str, fresh_db: str, tmp_path: Path
) -> None:
    world = generate(tmp_path / "world", parcels=60, scenes=3, seed=5, aoi_name="ms", year=2024)
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", 2024)
        upsert_user(cur, USER[0], USER[1], datasets=["ms"])
    assert (
        watch_once(dsn=pg_dsn, settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0)).new
        == 3
    )
    proc = subprocess.run(
        [CBMFLOW, "worker", "--idle-exit", "3"],
        env={**os.environ, "CBMFLOW_WORKER_ID": "backup-worker"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verify_truth(pg_dsn, world.truth_path, "ms", 2024).ok
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "SELECT parcel_id FROM ms.parcels_2024 p"
            " WHERE EXISTS (SELECT 1 FROM ms.sigs_2024 s WHERE s.pid = p.pid) ORDER BY pid LIMIT 3"
        )
        pids = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT count(*) FROM ms.sigs_2024")
        sig_rows = cur.fetchone()[0]
    assert len(pids) == 3
    before = _answers(pg_dsn, pids)
    assert all(before[f"/api/v1/datasets/ms/2024/timeseries?pid={p}"]["observations"] for p in pids)

    # Back up with the CLI; the manifest describes what it holds.
    out = tmp_path / "backup"
    res = _cli(pg_dsn, "backup", str(out))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT name FROM schema_migrations ORDER BY name")
        assert manifest["migrations"] == [r[0] for r in cur.fetchall()] != []
        cur.execute("SHOW server_version")
        assert manifest["server_version"] == cur.fetchone()[0]
    assert manifest["counts"] == {"scenes": 3, "datasets": 1, "users": 1}
    assert manifest["dump_bytes"] == sum(f["bytes"] for f in manifest["files"].values()) > 0
    assert "dump/toc.dat" in manifest["files"]
    assert "password" not in json.dumps(manifest).lower() or "passwords" in json.dumps(manifest["excludes"])
    assert "backup-password" not in res.stdout + res.stderr

    # A second backup into a non-empty directory is refused.
    assert _cli(pg_dsn, "backup", str(out)).returncode == 1

    # Restore into the empty database: the API answers exactly as before, no migration pending.
    res = _cli(fresh_db, "restore", str(out))
    assert res.returncode == 0, res.stderr
    assert db.migrate(fresh_db) == []
    assert _answers(fresh_db, pids) == before
    assert verify_truth(fresh_db, world.truth_path, "ms", 2024).ok
    with db.transaction(fresh_db) as cur:
        cur.execute("SELECT count(*) FROM ms.sigs_2024")
        assert cur.fetchone()[0] == sig_rows

    # The target is no longer empty: a second restore is refused unless forced, which replaces it.
    with db.transaction(fresh_db) as cur:
        cur.execute(
            "DELETE FROM ms.sigs_2024 WHERE pid IN (SELECT pid FROM ms.parcels_2024 WHERE parcel_id = %s)", (pids[0],)
        )
    res = _cli(fresh_db, "restore", str(out))
    assert res.returncode == 1 and "not empty" in res.stderr, res.stderr
    res = _cli(fresh_db, "restore", "--force", str(out))
    assert res.returncode == 0, res.stderr
    assert _answers(fresh_db, pids) == before
    assert db.migrate(fresh_db) == []

    # A damaged backup is refused before anything is touched.
    table_file = max((out / "dump").glob("*.dat.gz"), key=lambda p: p.stat().st_size)
    table_file.write_bytes(table_file.read_bytes()[:-10])
    res = _cli(fresh_db, "restore", "--force", str(out))
    assert res.returncode == 1 and "checksum" in res.stderr, res.stderr
    assert _answers(fresh_db, pids) == before
