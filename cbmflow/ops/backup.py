"""``cbmflow db backup`` / ``db restore``: the whole database with PostgreSQL's own tools.

pg_dump's directory format (one file per table, readable by any pg_restore of the same or a
later major version) plus a ``manifest.json`` that says what the copy is: when it was taken, from
which server, which migrations it contains, how big it is, and a SHA-256 per file, so that a
truncated or altered copy is refused before anything is written.

What a backup holds: everything inside the database (the schema, ``schema_migrations``, scenes,
outbox, datasets with their parcels, signatures and histograms, API users, grants and tokens).
What it does not hold: cluster-level roles and their passwords (``pg_dumpall --roles-only`` is
the tool for those), the RabbitMQ queues (jobs in flight are re-published from the outbox or by
``cbmflow jobs retry``), and the products in the object store (they are the input, kept by the
provider). Ownership is not restored (the restoring user owns every object), and grants only
with ``keep_grants`` (the roles must exist on the target cluster).

A restore goes into an empty database only (extension objects such as PostGIS's do not count),
unless forced, and runs in one transaction: a failed restore into an empty database leaves it
empty (a forced one has already dropped the old contents).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from cbmflow import db
from cbmflow.errors import ConfigError, InvalidInputError
from cbmflow.logging import get_logger

log = get_logger("backup")

MANIFEST = "manifest.json"
DUMP_DIR = "dump"
FORMAT = "cbmflow-backup"
FORMAT_VERSION = 1
PG_BIN = Path("/usr/lib/postgresql/15/bin")
"""Debian's postgresql-15 client tools (installed with the server by ``make setup``). The
``/usr/bin`` wrappers of postgresql-client-common pick a version by cluster, which is not ours."""
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")
EXCLUDED = [
    "cluster-level roles and their passwords (pg_dumpall --roles-only)",
    "object ownership (the restoring user owns every object) and, unless --keep-grants, grants",
    "RabbitMQ queues: jobs in flight (re-publish with `cbmflow jobs retry`)",
    "the products in the object store (the input; kept by the provider)",
]


class BackupError(ConfigError):
    """pg_dump/pg_restore failed, a binary is missing, or a backup does not match its manifest."""


@dataclass(frozen=True)
class RestoreReport:
    database: str
    forced: bool
    migrations: list[str]
    counts: dict[str, int] = field(default_factory=dict)


def tool(name: str) -> Path:
    """The PostgreSQL 15 binary ``name``; missing, it is an error (never a silent skip)."""
    path = PG_BIN / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found:
        return Path(found)
    raise BackupError(f"{name} not found in {PG_BIN} or on PATH: install Debian's postgresql-15 (make setup)")


def _conn_args(dsn: str) -> tuple[str, dict[str, str]]:
    """A libpq connection string without the password, and the environment carrying it, so the
    password never appears on a command line (``ps``) or in a log."""
    params = psycopg2.extensions.parse_dsn(dsn)
    password = params.pop("password", None)
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGPASSWORD", None)
    if password:
        env["PGPASSWORD"] = password
    return psycopg2.extensions.make_dsn(**params), env


def _run(args: list[str], env: dict[str, str], what: str) -> str:
    res = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BackupError(f"{what} failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _major(version: str) -> int:
    m = re.search(r"(\d+)(?:\.\d+)?", version)
    if not m:
        raise BackupError(f"cannot read a version from {version!r}")
    return int(m.group(1))


def _counts(cur: psycopg2.extensions.cursor) -> dict[str, int]:
    """Row counts of the tables an operator recognises, to compare a restore with its backup."""
    out: dict[str, int] = {}
    for table in ("scenes", "datasets", "users"):
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        row = cur.fetchone()
        if row and row[0]:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            n = cur.fetchone()
            out[table] = int(n[0]) if n else 0
    return out


def _migrations(cur: psycopg2.extensions.cursor) -> list[str]:
    cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = cur.fetchone()
    if not row or not row[0]:
        return []
    cur.execute("SELECT name FROM schema_migrations ORDER BY name")
    return [str(r[0]) for r in cur.fetchall()]


def backup(dsn: str, out_dir: Path, jobs: int = 1) -> dict[str, Any]:
    """Dump the database at ``dsn`` into ``out_dir`` (new or empty) and write its manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidInputError(f"{out_dir} is not empty: a backup goes into a new directory")
    pg_dump = tool("pg_dump")
    with db.transaction(dsn) as cur:
        cur.execute(
            "SELECT current_database(), current_setting('server_version'), pg_database_size(current_database())"
        )
        row = cur.fetchone()
        assert row is not None
        database, server_version, db_bytes = str(row[0]), str(row[1]), int(row[2])
        migrations = _migrations(cur)
        counts = _counts(cur)
    tool_version = _run([str(pg_dump), "--version"], dict(os.environ), "pg_dump --version").strip()
    if _major(tool_version.split()[-1]) < _major(server_version):
        raise BackupError(f"{tool_version} cannot dump a PostgreSQL {server_version} server (needs the same or newer)")
    conninfo, env = _conn_args(dsn)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    log.info("backup.start", database=database, dir=str(out_dir))
    _run(
        [str(pg_dump), "--format=directory", f"--jobs={max(1, jobs)}", "--file", str(out_dir / DUMP_DIR),
         "--dbname", conninfo],
        env,
        "pg_dump",
    )  # fmt: skip
    files: dict[str, dict[str, Any]] = {
        p.relative_to(out_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted((out_dir / DUMP_DIR).rglob("*"))
        if p.is_file()
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "database": database,
        "server_version": server_version,
        "pg_dump": tool_version,
        "migrations": migrations,
        "counts": counts,
        "database_bytes": db_bytes,
        "dump_bytes": sum(int(f["bytes"]) for f in files.values()),
        "files": files,
        "excludes": EXCLUDED,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("backup.done", database=database, files=len(files), dump_bytes=manifest["dump_bytes"])
    return manifest


def read_manifest(backup_dir: Path) -> dict[str, Any]:
    """The manifest, after checking every file it lists against its size and SHA-256."""
    path = Path(backup_dir) / MANIFEST
    if not path.is_file():
        raise BackupError(f"{path} not found: not a cbmflow backup directory")
    manifest: dict[str, Any] = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{path}: unknown format {manifest.get('format')!r} {manifest.get('format_version')!r}")
    for rel, meta in manifest["files"].items():
        f = Path(backup_dir) / rel
        if not f.is_file():
            raise BackupError(f"backup file {rel} is missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise BackupError(f"backup file {rel} does not match its manifest checksum")
    return manifest


def _user_objects(cur: psycopg2.extensions.cursor) -> list[str]:
    """Relations, functions and types in the database that no extension owns: what an empty
    database does not have (PostGIS's ``spatial_ref_sys`` and functions do not count)."""
    cur.execute(
        """
        SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname NOT IN %(sys)s AND n.nspname NOT LIKE 'pg\\_%%'
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                            AND d.objid = c.oid AND d.deptype = 'e')
        UNION ALL
        SELECT n.nspname || '.' || p.proname || '()' FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname NOT IN %(sys)s AND n.nspname NOT LIKE 'pg\\_%%'
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                            AND d.objid = p.oid AND d.deptype = 'e')
        UNION ALL
        SELECT 'schema ' || n.nspname FROM pg_namespace n
         WHERE n.nspname NOT IN %(sys)s AND n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> 'public'
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_namespace'::regclass
                            AND d.objid = n.oid AND d.deptype = 'e')
        ORDER BY 1
        """,
        {"sys": _SYSTEM_SCHEMAS},
    )
    return [str(r[0]) for r in cur.fetchall()]


def _wipe(cur: psycopg2.extensions.cursor) -> None:
    """Drop every schema but the system ones, every extension but plpgsql, and recreate an empty
    ``public``: the target of a forced restore ends up like a fresh database."""
    cur.execute("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'")
    for (ext,) in cur.fetchall():
        cur.execute(sql.SQL("DROP EXTENSION IF EXISTS {} CASCADE").format(sql.Identifier(ext)))
    cur.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT IN %s AND nspname NOT LIKE 'pg\\_%%'", (_SYSTEM_SCHEMAS,)
    )
    for (schema,) in cur.fetchall():
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    cur.execute("CREATE SCHEMA public")


def restore(dsn: str, backup_dir: Path, force: bool = False, keep_grants: bool = False) -> RestoreReport:
    """Restore ``backup_dir`` into the database at ``dsn``: empty, or wiped first when ``force``."""
    manifest = read_manifest(backup_dir)
    pg_restore = tool("pg_restore")
    with db.transaction(dsn) as cur:
        cur.execute("SELECT current_database()")
        row = cur.fetchone()
        assert row is not None
        database = str(row[0])
        found = _user_objects(cur)
        if found and not force:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise InvalidInputError(
                f"database {database} is not empty ({shown}): restore into a new database, or give --force"
                " to replace its contents"
            )
        if found:
            log.warning("restore.wipe", database=database, objects=len(found))
            _wipe(cur)
    conninfo, env = _conn_args(dsn)
    args = [str(pg_restore), "--single-transaction", "--exit-on-error", "--no-owner"]
    if not keep_grants:
        args.append("--no-acl")
    log.info("restore.start", database=database, backup=str(backup_dir), created_at=manifest["created_at"])
    _run([*args, "--dbname", conninfo, str(Path(backup_dir) / DUMP_DIR)], env, "pg_restore")
    with db.transaction(dsn) as cur:
        migrations = _migrations(cur)
        counts = _counts(cur)
    if migrations != manifest["migrations"] or counts != manifest["counts"]:
        raise BackupError(
            f"restored database differs from the manifest: migrations {migrations} vs {manifest['migrations']},"
            f" counts {counts} vs {manifest['counts']}"
        )
    log.info("restore.done", database=database, migrations=len(migrations), **counts)
    return RestoreReport(database=database, forced=bool(found), migrations=migrations, counts=counts)
