"""PostgreSQL access: connections, migrations and the per-dataset tables.

Identifiers (schemas, tables) only ever come from the ``datasets`` table and are composed with
``psycopg2.sql.Identifier``; values are always bound parameters.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from importlib.abc import Traversable
from typing import Any, TypeAlias

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from cbmflow.settings import DbSettings

Cursor: TypeAlias = psycopg2.extensions.cursor
"""The cursor type every function that runs SQL on a caller's transaction takes."""

MIGRATIONS_PACKAGE = "cbmflow.migrations"
"""The repository's ``sql/`` folder, installed under this name (``package-dir`` in pyproject.toml), so
one lookup finds the migrations in a wheel install and in an editable checkout alike."""

_MIGRATION_RE = re.compile(r"^[0-9]{3}_.+\.sql$")


def connect(dsn: str | None = None, **kwargs: Any) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn or DbSettings().resolved_dsn(), connect_timeout=10, **kwargs)
    return conn


DEAD_LETTER_LOCK = 0x63626D666C6471  # "cbmfldq": one reader of the dead-letter queue at a time
"""Advisory-lock key of the dead-letter queue's readers (the workers' reconciliation pass and
``jobs retry``). Each takes the letters off the queue while it decides and puts back those it keeps;
a second reader in that moment would see a queue short of them (and ``jobs retry`` would re-publish
nothing), so they take turns on this lock, held by the database rather than the broker."""


@contextmanager
def advisory_lock(dsn: str | None, key: int, *, wait: bool, timeout_s: float = 60.0) -> Iterator[bool]:
    """A session-level advisory lock held for the block; yields whether it was taken (always True
    with ``wait``, which gives up with ``psycopg2.errors.LockNotAvailable`` after ``timeout_s``).
    The lock dies with its session, so a reader killed mid-way never leaves it held."""
    conn = connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            if wait:
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(timeout_s * 1000)}ms",))
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
                taken = True
            else:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                row = cur.fetchone()
                taken = bool(row and row[0])
        yield taken
    finally:
        conn.close()


@contextmanager
def transaction(dsn: str | None = None) -> Iterator[psycopg2.extensions.cursor]:
    """One connection, one transaction: committed on success, rolled back on any exception."""
    conn = connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def migration_files(sql_dir: Traversable | None = None) -> list[Traversable]:
    """The ``NNN_*.sql`` files in order; none at all is an error.

    An install without its migrations (a wheel built without the package data) would otherwise
    report "none pending" against an empty database, which looks like success.
    """
    from cbmflow.errors import ConfigError

    if sql_dir is None:
        try:
            sql_dir = resources.files(MIGRATIONS_PACKAGE)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"no {MIGRATIONS_PACKAGE} package: cbmflow is not installed (pip install -e .)") from exc
    files = sorted((f for f in sql_dir.iterdir() if _MIGRATION_RE.match(f.name) and f.is_file()), key=lambda f: f.name)
    if not files:
        raise ConfigError(f"no NNN_*.sql migration files in {sql_dir}: the cbmflow install is incomplete")
    return files


def migrate(dsn: str | None = None, sql_dir: Traversable | None = None) -> list[str]:
    """Apply ``sql/NNN_*.sql`` files not yet recorded; returns the names applied.

    A checksum is kept per file so that editing an applied migration is caught instead of being
    silently ignored. An advisory lock serialises concurrent migrators.
    """
    files = migration_files(sql_dir)
    applied: list[str] = []
    conn = connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7421001)")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT name, sha256 FROM schema_migrations")
            done = dict(cur.fetchall())
            for path in files:
                text = path.read_text(encoding="utf-8")
                digest = hashlib.sha256(text.encode()).hexdigest()
                if path.name in done:
                    if done[path.name] != digest:
                        from cbmflow.errors import ConfigError

                        raise ConfigError(f"migration {path.name} changed after it was applied")
                    continue
                cur.execute(text)
                cur.execute("INSERT INTO schema_migrations (name, sha256) VALUES (%s, %s)", (path.name, digest))
                applied.append(path.name)
            apply_role_grants(cur)
    finally:
        conn.close()
    return applied


@dataclass(frozen=True)
class Dataset:
    """One (aoi, year) parcel set and where its tables live."""

    id: int
    aoi: str
    year: int
    schema_name: str
    parcel_table: str
    sigs_table: str
    hists_table: str
    srid: int
    buffer_m: float
    min_pixels: int
    parcels_version: int
    s2_bands: list[str] | None = None
    """Sentinel-2 bands to extract; None: JRC's set (``worker/bands.py``, migration 007)."""
    created_at: datetime | None = None
    """Tells this deployment's dataset apart from another's with the same id (shared index cache)."""

    def ident(self, table: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema_name), sql.Identifier(table))

    @property
    def parcels(self) -> sql.Composed:
        return self.ident(self.parcel_table)

    @property
    def sigs(self) -> sql.Composed:
        return self.ident(self.sigs_table)

    @property
    def hists(self) -> sql.Composed:
        return self.ident(self.hists_table)


_DATASET_COLS = (
    "id, aoi, year, schema_name, parcel_table, sigs_table, hists_table, srid, buffer_m, min_pixels, parcels_version,"
    " s2_bands, created_at"
)


def get_dataset(cur: psycopg2.extensions.cursor, aoi: str, year: int) -> Dataset | None:
    cur.execute(f"SELECT {_DATASET_COLS} FROM datasets WHERE aoi = %s AND year = %s", (aoi, year))  # noqa: S608
    row = cur.fetchone()
    return Dataset(*row) if row else None


def list_datasets(cur: psycopg2.extensions.cursor) -> list[Dataset]:
    cur.execute(f"SELECT {_DATASET_COLS} FROM datasets ORDER BY aoi, year")  # noqa: S608
    return [Dataset(*row) for row in cur.fetchall()]


def ensure_dataset(cur: psycopg2.extensions.cursor, aoi: str, year: int, srid: int, description: str = "") -> Dataset:
    """Create (or return) the dataset row and its schema and tables."""
    existing = get_dataset(cur, aoi, year)
    if existing is None:
        cur.execute(
            "INSERT INTO datasets (aoi, year, schema_name, parcel_table, sigs_table, hists_table, srid, description)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (aoi, year) DO NOTHING",
            (aoi, year, aoi, f"parcels_{year}", f"sigs_{year}", f"hists_{year}", srid, description),
        )
        existing = get_dataset(cur, aoi, year)
        assert existing is not None
    ds = existing
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(ds.schema_name)))
    cur.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} ("
            " pid integer PRIMARY KEY,"
            " parcel_id text NOT NULL UNIQUE,"
            " crop_code text,"
            " crop_name text,"
            " geom geometry(MultiPolygon, {srid}) NOT NULL)"
        ).format(t=ds.parcels, srid=sql.Literal(int(ds.srid)))
    )
    cur.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {ix} ON {t} USING gist (geom)").format(
            ix=sql.Identifier(f"{ds.parcel_table}_geom_gix"), t=ds.parcels
        )
    )
    # Signatures and histograms: one row per (parcel, scene) behind views of the row-per-band
    # shape (sql/011_compact_signatures.sql, which also converts datasets made before it).
    cur.execute("SELECT cbmflow_compact_signatures(%s, %s, %s)", (ds.schema_name, ds.sigs_table, ds.hists_table))
    grant_dataset(cur, ds)
    return ds


# --- Database roles (least privilege) -------------------------------------------------------------

ROLES: dict[str, str] = {"watcher": "cbmflow_watcher", "worker": "cbmflow_worker", "api": "cbmflow_api"}
"""Component → NOLOGIN group role (created by sql/005_roles_tokens.sql). The owner is whoever runs
``cbmflow db migrate``: it owns every object and is the only role that changes the schema."""

ROLE_GRANTS: dict[str, tuple[tuple[str, str], ...]] = {
    # Scans the catalogue, upserts scenes, writes and flushes the outbox.
    "cbmflow_watcher": (
        ("aois", "SELECT"),
        ("datasets", "SELECT"),
        ("scenes", "SELECT, INSERT, UPDATE"),
        ("outbox", "SELECT, INSERT, UPDATE"),
        ("rejected_items", "SELECT, INSERT, UPDATE"),
        ("watch_cursors", "SELECT, INSERT, UPDATE"),
        ("card_inputs", "SELECT, INSERT, UPDATE"),
        ("scenes_id_seq", "USAGE, SELECT"),
        ("outbox_id_seq", "USAGE, SELECT"),
        ("card_inputs_id_seq", "USAGE, SELECT"),
    ),
    # Claims and leases scenes, registers and heartbeats, takes fleet-wide task slots (the
    # dead-letter reconciliation); sigs/hists: see grant_dataset. A CARD job (GenerateCard) leases
    # its card input, registers the scenes it made and writes their extraction jobs to the outbox
    # (INSERT and the id it returns only: it can neither read nor publish other rows).
    "cbmflow_worker": (
        ("aois", "SELECT"),
        ("datasets", "SELECT"),
        ("scenes", "SELECT, INSERT, UPDATE"),
        ("card_inputs", "SELECT, UPDATE"),
        ("outbox", "SELECT (id), INSERT"),
        ("scenes_id_seq", "USAGE, SELECT"),
        ("outbox_id_seq", "USAGE, SELECT"),
        ("workers", "SELECT, INSERT, UPDATE"),
        ("worker_tasks", "SELECT, INSERT, UPDATE"),
    ),
    # Reads what it serves and its auth tables; writes no table (token use is not recorded; failed
    # logins go through the EXECUTE-only functions of sql/015, granted there).
    "cbmflow_api": (
        ("aois", "SELECT"),
        ("datasets", "SELECT"),
        ("scenes", "SELECT"),
        ("users", "SELECT"),
        ("user_grants", "SELECT"),
        ("api_tokens", "SELECT"),
    ),
}
"""Table privileges of each group role in the public schema, (re)applied by every ``migrate``. A
migration adding a table a component uses adds a line here; a table not (yet) in the database is
skipped, so the list may name tables of migrations a database has not reached."""


def _role_exists(cur: Cursor, role: str) -> bool:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    return cur.fetchone() is not None


def apply_role_grants(cur: Cursor) -> None:
    """GRANT each group role its table privileges, and its privileges on every dataset's tables.

    Idempotent; runs at the end of every ``migrate`` (even with nothing pending), so an upgraded
    database and datasets created before the roles existed get their grants. Without the roles
    (migrations of a foreign ``sql_dir``) it does nothing.
    """
    for role, grants in ROLE_GRANTS.items():
        if not _role_exists(cur, role):
            return
        for table, privileges in grants:
            cur.execute("SELECT to_regclass(%s)", (f"public.{table}",))
            row = cur.fetchone()
            if row is None or row[0] is None:
                continue
            # privileges come from the constant above, never from input
            cur.execute(
                sql.SQL("GRANT " + privileges + " ON {} TO {}").format(  # noqa: S608
                    sql.Identifier("public", table), sql.Identifier(role)
                )
            )
    cur.execute("SELECT to_regclass('public.datasets')")
    row = cur.fetchone()
    if row is not None and row[0] is not None:
        for ds in list_datasets(cur):
            grant_dataset(cur, ds)


def grant_dataset(cur: Cursor, ds: Dataset) -> None:
    """Privileges on one dataset's schema: the worker reads parcels and replaces a scene's rows in
    sigs/hists (DELETE + COPY: row ownership by scene is enforced by the lease, not by PostgreSQL),
    the API reads all three. Called when the dataset is created (parcel import) and by ``migrate``."""
    worker, api = ROLES["worker"], ROLES["api"]
    if not (_role_exists(cur, worker) and _role_exists(cur, api)):
        return
    both = sql.SQL(", ").join([sql.Identifier(worker), sql.Identifier(api)])
    cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(ds.schema_name), both))
    cur.execute(sql.SQL("GRANT SELECT ON {}, {}, {} TO {}").format(ds.parcels, ds.sigs, ds.hists, both))
    cur.execute(sql.SQL("GRANT INSERT, DELETE ON {}, {} TO {}").format(ds.sigs, ds.hists, sql.Identifier(worker)))
    # Tables an operator adds to the schema later (JRC ``ptype`` parcel variants) are served too.
    cur.execute(
        sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
            sql.Identifier(ds.schema_name), sql.Identifier(api)
        )
    )


def login_role_name(component: str) -> str:
    """The LOGIN role ``role_dsn`` creates for a component: ``cbmflow_<component>_login``."""
    from cbmflow.errors import InvalidInputError

    if component not in ROLES:
        raise InvalidInputError(f"unknown role {component!r}: one of {', '.join(ROLES)}")
    return f"{ROLES[component]}_login"


def role_dsn(owner_dsn: str, component: str) -> str:
    """Create (or rotate the password of) the component's LOGIN role and return its DSN.

    The password is random and sent to the server only as a SCRAM verifier computed here
    (``encrypt_password``), so it never reaches the server's statement log or ``pg_authid`` in
    plain text; the returned DSN is the only copy. Rotating invalidates the previous DSN for new
    connections (open ones stay until they reconnect).
    """
    import secrets

    from cbmflow.errors import ConfigError

    login = login_role_name(component)
    group = ROLES[component]
    password = secrets.token_urlsafe(24)
    conn = connect(owner_dsn)
    try:
        with conn, conn.cursor() as cur:
            if not _role_exists(cur, group):
                raise ConfigError(f"no role {group}: run `cbmflow db migrate` first")
            verifier = psycopg2.extensions.encrypt_password(password, login, conn, "scram-sha-256")
            verb = "ALTER" if _role_exists(cur, login) else "CREATE"
            cur.execute(
                sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT PASSWORD {}").format(
                    sql.Identifier(login), sql.Literal(verifier)
                )
            )
            cur.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(login)))
    finally:
        conn.close()
    return str(psycopg2.extensions.make_dsn(owner_dsn, user=login, password=password))
