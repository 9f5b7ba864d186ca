"""The wheel as an operator gets it: built from this checkout, installed into a fresh virtualenv
the way a worker VM installs it, then run against a throwaway database.

An editable install reads everything from the checkout, so it cannot show that the migrations are
inside the package or that a ``[worker]`` install leaves the API, cloud and SSH libraries out;
only a real wheel in a separate virtualenv can. One virtualenv (``cbmflow[worker]``, with the
requirement taken from the rendered user-data) serves every check: ``db migrate`` needs only the
core dependencies it also holds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import psycopg2
import pytest
import yaml
from psycopg2 import sql
from stackfixtures import Stack

from cbmflow import db
from cbmflow.errors import ConfigError
from provisioner.userdata import render_userdata

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cbmflow", "catalog_watcher", "provisioner", "worker", "card", "api")
MIGRATIONS = sorted(p.name for p in (ROOT / "sql").glob("[0-9][0-9][0-9]_*.sql"))
# What a worker VM must not carry (the import-linter contract keeps the worker's code off them).
NOT_ON_A_WORKER = ("starlette", "uvicorn", "matplotlib", "openstack", "fabric", "argon2")
CORE = {"psycopg2-binary", "pika", "pydantic", "pydantic-settings", "structlog", "requests", "rich", "typer"}


def _run(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def _clean_env(**extra: str) -> dict[str, str]:
    """This test process's environment without what would let the checkout leak into the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the checkout: setuptools writes ``build/`` and ``*.egg-info``
    beside pyproject.toml, and the checkout is shared with other running builds and tests."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("sql", *PACKAGES):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    built = _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)], 300, env=_clean_env())
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = dist.glob("cbmflow-*.whl")
    return path


@pytest.fixture(scope="module")
def worker_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh virtualenv with exactly what the wheel-mode user-data has a worker VM install."""
    doc = yaml.safe_load(render_userdata({}, install="wheel", wheel_url=str(wheel)))
    requirement = doc["runcmd"][-2][-1]
    assert requirement == f"cbmflow[worker] @ {wheel.as_uri()}"
    venv = tmp_path_factory.mktemp("venv")
    made = _run([sys.executable, "-m", "venv", str(venv)], 120)
    assert made.returncode == 0, made.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", requirement]
    installed = _run(pip, 600, env=_clean_env())
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return venv


@pytest.fixture
def empty_db(stack: Stack) -> Iterator[str]:
    """DSN of a new, empty database (not the migrated template): the wheel's migrate must build it all."""
    name = f"wheel_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(stack.pg.dsn_for("postgres"), connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield stack.pg.dsn_for(name)
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        conn.close()


def test_the_wheel_holds_the_migrations_every_package_and_a_slim_core(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(metadata_name).decode())
    assert len(MIGRATIONS) >= 3
    assert sorted(n.rpartition("/")[2] for n in names if n.endswith(".sql")) == MIGRATIONS
    assert {f"cbmflow/migrations/{m}" for m in MIGRATIONS} <= names
    source_packages = {
        str(init.parent.relative_to(ROOT))
        for top in PACKAGES
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert source_packages and {p for p in source_packages if f"{p}/__init__.py" not in names} == set()
    assert {f"{top}/py.typed" for top in PACKAGES} <= names
    assert not any(n.startswith("tests/") for n in names)
    requires = metadata.get_all("Requires-Dist") or []
    core = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert core == CORE
    assert {"worker", "extract", "api", "provisioner", "watcher", "parcels", "all", "dev"} <= set(
        metadata.get_all("Provides-Extra") or []
    )


def test_db_migrate_from_the_wheel_builds_the_schema(worker_venv: Path, empty_db: str, tmp_path: Path) -> None:
    python, cbmflow = str(worker_venv / "bin" / "python"), str(worker_venv / "bin" / "cbmflow")
    env = _clean_env(CBMFLOW_DB_DSN=empty_db)
    where = _run([python, "-c", "import cbmflow.db as d; print(d.migration_files()[0])"], 60, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(worker_venv)), where.stdout  # the wheel's copy, not the checkout's sql/

    first = _run([cbmflow, "db", "migrate"], 120, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip() == f"applied {len(MIGRATIONS)} migration(s): {', '.join(MIGRATIONS)}"
    again = _run([cbmflow, "db", "migrate"], 120, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "applied 0 migration(s): none pending" in again.stdout, again.stderr

    tables = sorted(
        {
            t
            for m in MIGRATIONS
            for t in re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?((?!IF\b)\w+)", (ROOT / "sql" / m).read_text())
        }
    )
    assert "scenes" in tables
    conn = psycopg2.connect(empty_db, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM schema_migrations ORDER BY name")
            assert [r[0] for r in cur.fetchall()] == MIGRATIONS
            cur.execute("SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL", (tables,))
            assert cur.fetchall() == []
    finally:
        conn.close()


def test_migrate_without_migration_files_fails_before_touching_the_database(empty_db: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no NNN_"):
        db.migrate(empty_db, sql_dir=tmp_path)
    conn = psycopg2.connect(empty_db, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_migrations')")
            assert cur.fetchone() == (None,)
    finally:
        conn.close()


def test_a_worker_install_runs_the_worker_and_names_the_extra_other_commands_need(
    worker_venv: Path, tmp_path: Path
) -> None:
    python, cbmflow = str(worker_venv / "bin" / "python"), str(worker_venv / "bin" / "cbmflow")
    env = _clean_env(CBMFLOW_DB_DSN="postgresql://cbmflow@127.0.0.1:1/none")
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))"
    found = _run([python, "-c", probe, *NOT_ON_A_WORKER], 60, env=env, cwd=tmp_path)
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr
    # the worker's own code imports with the worker extra alone (numba, rasterio, boto3, ...)
    imported = _run(
        [python, "-c", "import worker.consumer, worker.engine, card.s1, card.s2"], 120, env=env, cwd=tmp_path
    )
    assert imported.returncode == 0, imported.stderr

    helped = _run([cbmflow, "worker", "--help"], 60, env=env, cwd=tmp_path)
    assert helped.returncode == 0 and "--max-jobs" in helped.stdout, helped.stdout + helped.stderr
    listed = _run([cbmflow, "--help"], 60, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for command in ("worker", "db", "api", "users", "provision", "watch", "parcels", "aoi", "extract", "demo"):
        assert re.search(rf"│ {re.escape(command)} ", listed.stdout), command

    for cmd, extra in ((["api"], "api"), (["provision", "render-userdata", "--example"], "provisioner")):
        result = _run([cbmflow, *cmd], 60, env=env, cwd=tmp_path)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"pip install 'cbmflow[{extra}]'" in result.stderr and "Traceback" not in result.stderr, result.stderr
