"""The local stack: PostgreSQL 15 + PostGIS and RabbitMQ (+ management) on 127.0.0.1.

Developers, the demo and the test suite all run against real servers rather than mocks, because
the behaviour cbmflow depends on (quorum queues, delivery limits, consumer timeouts, PostGIS
functions, advisory locks) is exactly what a mock gets wrong. The Debian packages are used as
they are, without their system services: each stack lives in its own directory, on its own ports,
bound to loopback only, and runs as an unprivileged user (``StackSettings.run_as``) because
PostgreSQL refuses to run as root and a development broker has no business running as root either.

Layout under the state directory::

    stack.json            DSN and URLs with credentials (0600), read by cbmflow.settings.stack_info()
    stack-home            where postgres/ and rabbitmq/ are, when not here (see below)
    postgres/instance.json password, ports (0600, owned by the invoking user)
    postgres/data          the cluster (owned by run_as)
    rabbitmq/instance.json password, node name, ports (0600)
    rabbitmq/{home,etc,mnesia,log,run}  node state (owned by run_as)

The servers' user must be able to reach their directories. A checkout under a 0700 home (root
cloning into /root) has a state directory nobody else can traverse; then postgres/ and rabbitmq/
go to ``StackSettings.data_root`` (``/var/lib/cbmflow/stacks/<name>-<hash of the state dir>``)
instead, recorded in ``stack-home``, while ``stack.json`` with the credentials stays in the checkout.

Credentials are generated once and kept in ``instance.json`` so that ``up`` after ``down`` (or
after a reboot) gives the same DSN and URLs, and anything configured with them keeps working.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import requests
import typer
from psycopg2 import sql

from cbmflow.errors import ConfigError
from cbmflow.logging import get_logger
from cbmflow.settings import StackSettings, state_dir

log = get_logger("stack")

# Absolute paths on purpose: other pg_ctl binaries (e.g. /usr/local/bin) may shadow Debian's, and
# /usr/sbin/rabbitmq-server would switch to the `rabbitmq` system user and its /var/lib state.
PG_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGIS_CONTROL = Path("/usr/share/postgresql/15/extension/postgis.control")
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")

HOST = "127.0.0.1"
RABBIT_USER = "cbmflow"
PG_DIR = "postgres"
RABBIT_DIR = "rabbitmq"
STACK_JSON = "stack.json"
STACK_HOME = "stack-home"
INSTANCE_JSON = "instance.json"
# Unix socket paths are limited to 107 bytes (sun_path); past that the socket is simply left out.
_MAX_SOCKET_PATH = 100


class StackError(ConfigError):
    """The local stack could not be started or stopped; the message says what the operator must do."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgInfo:
    """A running local PostgreSQL, as much as a client or a test needs to know about it."""

    base_dir: Path
    data_dir: Path
    socket_dir: Path | None
    log_file: Path
    host: str
    port: int
    db_name: str
    db_user: str
    password: str
    pid: int
    run_as: str
    started: bool

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.db_name)

    def dsn_for(self, db_name: str) -> str:
        """The DSN of another database of the same cluster (tests create one per test)."""
        user = urllib.parse.quote(self.db_user, safe="")
        pw = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{user}:{pw}@{self.host}:{self.port}/{urllib.parse.quote(db_name, safe='')}"

    def public(self) -> dict[str, Any]:
        """Everything but the password, JSON-ready."""
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        d.pop("password")
        return d


@dataclass(frozen=True)
class RabbitInfo:
    """A running local RabbitMQ node with the management plugin."""

    base_dir: Path
    log_dir: Path
    host: str
    amqp_port: int
    management_port: int
    dist_port: int
    epmd_port: int
    nodename: str
    user: str
    password: str
    pid: int
    run_as: str
    consumer_timeout_ms: int
    started: bool

    def amqp_url_for(self, vhost: str = "/") -> str:
        """AMQP URL of a vhost; the vhost is percent-encoded because ``/`` is a legal vhost name."""
        user = urllib.parse.quote(self.user, safe="")
        pw = urllib.parse.quote(self.password, safe="")
        return f"amqp://{user}:{pw}@{self.host}:{self.amqp_port}/{urllib.parse.quote(vhost, safe='')}"

    @property
    def amqp_url(self) -> str:
        return self.amqp_url_for("/")

    @property
    def management_url(self) -> str:
        user = urllib.parse.quote(self.user, safe="")
        pw = urllib.parse.quote(self.password, safe="")
        return f"http://{user}:{pw}@{self.host}:{self.management_port}"

    @property
    def console_url(self) -> str:
        return f"http://{self.host}:{self.management_port}/"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    def public(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        d.pop("password")
        return d


# --------------------------------------------------------------------------------------------
# Users, files, processes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    switch: bool  # False when we are not root: the servers then run as the invoking user


def _resolve_user(run_as: str) -> _User:
    """Whom the servers run as: ``run_as`` when we are root, else ourselves (no way to switch)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        if run_as and run_as != me.pw_name:
            log.info("stack.run_as_ignored", run_as=run_as, user=me.pw_name, reason="not root")
        return _User(me.pw_name, me.pw_uid, me.pw_gid, tuple(os.getgroups()), switch=False)
    try:
        pw = pwd.getpwnam(run_as)
    except KeyError:
        raise StackError(
            f"run-as user {run_as!r} does not exist; set CBMFLOW_STACK_RUN_AS to an existing unprivileged user"
        ) from None
    if pw.pw_uid == 0:
        raise StackError("the stack must not run as root (PostgreSQL refuses to); set CBMFLOW_STACK_RUN_AS")
    groups = tuple(sorted({pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if run_as in g.gr_mem)}))
    return _User(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, switch=True)


def _require(path: Path, package: str) -> None:
    if not os.access(path, os.X_OK if path.suffix != ".control" else os.R_OK):
        raise StackError(
            f"{path} not found: install the Debian package {package} (apt-get install -y {package}, or `make setup`)"
        )


def _blocking_dir(path: Path, user: _User) -> tuple[Path, os.stat_result] | None:
    """The first directory on the way to ``path`` (itself included) that ``user`` cannot traverse."""
    for d in [path, *path.parents]:
        st = d.stat()
        if st.st_uid == user.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in user.groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return d, st
    return None


def _check_traversable(path: Path, user: _User) -> None:
    """Fail early and clearly when run_as cannot reach the stack directory.

    The usual culprit is a 0700 parent such as /root or pytest's /tmp/pytest-of-root, which
    otherwise shows up later as an obscure "permission denied" deep in a server log.
    """
    if not user.switch:
        return
    blocked = _blocking_dir(path, user)
    if blocked is not None:
        d, st = blocked
        raise StackError(
            f"user {user.name} cannot traverse {d} (mode {stat.filemode(st.st_mode)}), so it cannot reach {path}:"
            f" choose another CBMFLOW_STATE_DIR or `chmod o+x {d}`"
        )


def _mkdir_owned(path: Path, user: _User, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if user.switch:
        _chown_tree(path, user)
    return path


def _chown_tree(path: Path, user: _User) -> None:
    """Hand a directory tree to run_as; skipped when already owned, so restarts stay cheap."""
    st = path.lstat()
    if st.st_uid == user.uid and st.st_gid == user.gid:
        return
    os.lchown(path, user.uid, user.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.uid, user.gid)


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write atomically with the final mode from the start: credentials are never world-readable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _proc_alive(pid: int, comm: str) -> bool:
    """True if ``pid`` is a live process named ``comm``: a stale pid file after a reboot often
    points at an unrelated process, and signalling that would be a disaster."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return name == comm and state not in ("Z", "X")


def _wait_gone(pid: int, comm: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _proc_alive(pid, comm):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _kill(pid: int, comm: str, sig: signal.Signals) -> None:
    if _proc_alive(pid, comm):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _port_free(port: int) -> bool:
    """Whether a server could bind ``port`` on loopback (SO_REUSEADDR like the servers themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _accepts(port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _require_free(ports: dict[str, int]) -> None:
    busy = [f"{port} ({name})" for name, port in ports.items() if not _port_free(port)]
    if busy:
        raise StackError(
            f"port(s) {', '.join(busy)} on {HOST} already in use by another process:"
            " stop it or choose other CBMFLOW_STACK_*_PORT values"
        )


def _run(
    cmd: list[str], user: _User, env: dict[str, str], cwd: Path, timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """Run a helper as run_as. ``user=``/``group=`` instead of preexec_fn: safe with threads."""
    kwargs: dict[str, Any] = {}
    if user.switch:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
    return subprocess.run(
        cmd,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        check=False,
        **kwargs,
    )


def _parse_addr(hexaddr: str) -> tuple[str, int]:
    addr, port = hexaddr.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    # IPv6: four host-endian 32-bit words
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words), int(port, 16)


def _listening_inodes() -> dict[int, tuple[str, int]]:
    found: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A":  # TCP_LISTEN
                found[int(f[9])] = _parse_addr(f[1])
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def listen_addresses(pid: int) -> set[tuple[str, int]]:
    """TCP (address, port) pairs process ``pid`` listens on, from /proc: lets tests and operators
    verify that nothing of the stack is reachable from outside the machine."""
    listening = _listening_inodes()
    return {listening[i] for i in _socket_inodes(pid) if i in listening}


def pids_listening_on(port: int) -> list[int]:
    """Processes with a TCP listener on ``port`` (any address)."""
    inodes = {i for i, (_, p) in _listening_inodes().items() if p == port}
    pids: list[int] = []
    if not inodes:
        return pids
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _socket_inodes(int(entry)) & inodes:
            pids.append(int(entry))
    return pids


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def _pg_env() -> dict[str, str]:
    """A clean environment: a developer's PGDATA/PGPORT/PGHOST must not redirect our pg_ctl."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC"}


def _pg_pid(data_dir: Path) -> int | None:
    """The postmaster pid if this cluster is really running (not merely a leftover postmaster.pid)."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _proc_alive(pid, "postgres"):
        return None
    with contextlib.suppress(OSError):
        if Path(os.readlink(f"/proc/{pid}/cwd")) != data_dir.resolve():
            return None
    return pid


def _pg_running_port(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data_dir / "postmaster.pid").read_text().splitlines()[3])
    return None


def _pg_conf(port: int, socket_dir: Path | None) -> str:
    sockets = str(socket_dir) if socket_dir else ""
    return (
        "# Written by `cbmflow stack up` at every start; edit postgresql.conf for lasting changes.\n"
        f"listen_addresses = '{HOST}'\n"
        f"port = {port}\n"
        f"unix_socket_directories = '{sockets}'\n"
        "max_connections = 200\n"
        "shared_buffers = 128MB\n"
        "work_mem = 16MB\n"
        "maintenance_work_mem = 128MB\n"
        "timezone = 'UTC'\n"
        "log_timezone = 'UTC'\n"
        "log_min_duration_statement = 5000\n"
    )


def _pg_init(base_dir: Path, data_dir: Path, user: _User, db_user: str, password: str) -> None:
    """initdb into a scratch directory renamed at the end, so an interrupted initdb never leaves
    a half-made cluster that a later ``up`` would mistake for a real one."""
    scratch = base_dir / "data.init"
    if scratch.exists():
        shutil.rmtree(scratch)
    _mkdir_owned(scratch, user)
    pwfile = base_dir / ".pwfile"
    _write_private(pwfile, password + "\n")
    if user.switch:
        os.chown(pwfile, user.uid, user.gid)
    try:
        res = _run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(scratch),
                "-U",
                db_user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            user,
            _pg_env(),
            base_dir,
            timeout_s=180,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if res.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise StackError(f"initdb failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    with (scratch / "postgresql.conf").open("a") as fh:
        fh.write("\n# cbmflow: ports, sockets and sizes of the local stack\ninclude_if_exists = 'cbmflow.conf'\n")
    scratch.rename(data_dir)
    log.info("stack.pg_initialised", data_dir=str(data_dir), db_user=db_user)


def _ensure_database(info_dsn: str, db_name: str) -> None:
    conn = psycopg2.connect(info_dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db_name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))
                log.info("stack.pg_database_created", db_name=db_name)
    finally:
        conn.close()


def start_postgres(
    base_dir: Path,
    port: int,
    run_as: str,
    db_name: str = "cbmflow",
    db_user: str = "cbmflow",
    *,
    timeout_s: float = 60.0,
) -> PgInfo:
    """Initialise (first time), start (unless running) and return a local PostgreSQL 15 cluster.

    The cluster superuser is ``db_user`` because ``CREATE EXTENSION postgis`` needs a superuser
    and the local stack is single-tenant; TCP and socket logins both require the generated
    password (scram-sha-256), so other local users cannot walk in.
    """
    for binary in ("initdb", "pg_ctl", "postgres"):
        _require(PG_BIN / binary, "postgresql-15")
    _require(POSTGIS_CONTROL, "postgresql-15-postgis-3")
    base_dir = base_dir.absolute()
    user = _resolve_user(run_as)
    if not base_dir.exists():
        base_dir.mkdir(parents=True)
        base_dir.chmod(0o755)
    _check_traversable(base_dir, user)
    data_dir = base_dir / "data"
    inst_path = base_dir / INSTANCE_JSON
    inst = _load_json(inst_path) or {}
    if data_dir.exists():
        if "password" not in inst:
            raise StackError(
                f"{data_dir} holds a cluster but {inst_path} with its password is missing: remove {base_dir}"
            )
        if inst.get("db_user", db_user) != db_user:
            log.warning("stack.pg_db_user_fixed", wanted=db_user, superuser=inst["db_user"])
        db_user = str(inst.get("db_user", db_user))
    else:
        inst = {"password": inst.get("password") or secrets.token_urlsafe(24), "db_user": db_user}
        _write_private(inst_path, json.dumps(inst, indent=2))
        _pg_init(base_dir, data_dir, user, db_user, str(inst["password"]))
    password = str(inst["password"])
    log_dir = _mkdir_owned(base_dir / "log", user, 0o755)
    log_file = log_dir / "postgres.log"
    socket_dir: Path | None = base_dir / "run"
    if len(str(base_dir / "run" / f".s.PGSQL.{port}")) > _MAX_SOCKET_PATH:
        socket_dir = None  # TCP only; pg_ctl -w then checks readiness over TCP

    pid = _pg_pid(data_dir)
    started = pid is None
    if pid is not None:
        running_port = _pg_running_port(data_dir) or port
        if running_port != port:
            log.warning("stack.pg_port_differs", wanted=port, running=running_port, hint="stack down; stack up")
        port = running_port
        socket_dir = Path(str(inst["socket_dir"])) if inst.get("socket_dir") else None
        log.info("stack.pg_already_running", pid=pid, port=port)
    else:
        stale = data_dir / "postmaster.pid"
        if stale.exists():
            log.warning("stack.pg_stale_pid", path=str(stale))
            stale.unlink()
        _require_free({"CBMFLOW_STACK_PG_PORT": port})
        if socket_dir is not None:
            _mkdir_owned(socket_dir, user, 0o755)
            for leftover in socket_dir.glob(f".s.PGSQL.{port}*"):
                leftover.unlink()
        conf = data_dir / "cbmflow.conf"
        conf.write_text(_pg_conf(port, socket_dir))
        if user.switch:
            _chown_tree(data_dir, user)
            os.chown(conf, user.uid, user.gid)
        res = _run(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data_dir),
                "-l",
                str(log_file),
                "-w",
                "-t",
                str(int(timeout_s)),
                "start",
            ],
            user,
            _pg_env(),
            base_dir,
            timeout_s=timeout_s + 10,
        )
        pid = _pg_pid(data_dir)
        if res.returncode != 0 or pid is None:
            raise StackError(
                f"PostgreSQL did not start (pg_ctl exit {res.returncode}): {res.stderr.strip()}\n"
                f"--- {log_file}:\n{_tail(log_file)}"
            )
        log.info("stack.pg_started", pid=pid, port=port, data_dir=str(data_dir), run_as=user.name)

    info = PgInfo(
        base_dir=base_dir,
        data_dir=data_dir,
        socket_dir=socket_dir,
        log_file=log_file,
        host=HOST,
        port=port,
        db_name=db_name,
        db_user=db_user,
        password=password,
        pid=pid,
        run_as=user.name,
        started=started,
    )
    _ensure_database(info.dsn_for("postgres"), db_name)
    inst.update(port=port, db_name=db_name, run_as=user.name, socket_dir=str(socket_dir) if socket_dir else None)
    _write_private(inst_path, json.dumps(inst, indent=2))
    return info


def stop_postgres(base_dir: Path, *, timeout_s: float = 60.0) -> bool:
    """Stop the cluster in ``base_dir`` (fast shutdown: sessions are cut, data is safe).

    Returns whether it was running. Falls back to immediate shutdown, then SIGKILL, so that a
    wedged server never outlives a test session.
    """
    base_dir = base_dir.absolute()
    data_dir = base_dir / "data"
    pid = _pg_pid(data_dir)
    if pid is None:
        return False
    inst = _load_json(base_dir / INSTANCE_JSON) or {}
    user = _resolve_user(str(inst.get("run_as", "nobody")))
    try:
        res = _run(
            [str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "-t", str(int(timeout_s)), "stop"],
            user,
            _pg_env(),
            base_dir,
            timeout_s=timeout_s + 10,
        )
        ok = res.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("stack.pg_ctl_stop_failed", error=str(exc))
        ok = False
    if not ok or not _wait_gone(pid, "postgres", 5):
        log.warning("stack.pg_forced_stop", pid=pid)
        _kill(pid, "postgres", signal.SIGQUIT)
        if not _wait_gone(pid, "postgres", 10):
            _kill(pid, "postgres", signal.SIGKILL)
            _wait_gone(pid, "postgres", 5)
    log.info("stack.pg_stopped", pid=pid, data_dir=str(data_dir))
    return True


def postgres_status(base_dir: Path) -> dict[str, Any]:
    base_dir = base_dir.absolute()
    inst = _load_json(base_dir / INSTANCE_JSON) or {}
    pid = _pg_pid(base_dir / "data")
    port = inst.get("port")
    return {
        "running": pid is not None and isinstance(port, int) and _accepts(port),
        "pid": pid,
        "host": HOST,
        "port": port,
        "db_name": inst.get("db_name"),
        "db_user": inst.get("db_user"),
        "run_as": inst.get("run_as"),
        "data_dir": str(base_dir / "data"),
        "log_file": str(base_dir / "log" / "postgres.log"),
    }


# --------------------------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------------------------


def _rabbit_env(base_dir: Path, inst: dict[str, Any]) -> dict[str, str]:
    """Everything the node and rabbitmqctl need, none of it from /etc/rabbitmq or the caller.

    ERL_EPMD_PORT gives each stack its own epmd, so parallel stacks (tests, a developer's stack
    next to CI) never share or kill each other's port mapper.
    """
    loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": str(base_dir / "home"),
        "RABBITMQ_CONF_ENV_FILE": str(base_dir / "etc" / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(base_dir / "etc" / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base_dir / "etc" / "enabled_plugins"),
        "RABBITMQ_ENABLED_PLUGINS": "rabbitmq_management",
        "RABBITMQ_NODENAME": str(inst["nodename"]),
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODE_PORT": str(inst["amqp_port"]),
        "RABBITMQ_DIST_PORT": str(inst["dist_port"]),
        "RABBITMQ_MNESIA_BASE": str(base_dir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base_dir / "log"),
        "RABBITMQ_PID_FILE": str(base_dir / "run" / "rabbitmq.pid"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback,
        "RABBITMQ_CTL_ERL_ARGS": loopback,
        "ERL_EPMD_ADDRESS": HOST,
        "ERL_EPMD_PORT": str(inst["epmd_port"]),
    }


def _rabbit_conf(inst: dict[str, Any]) -> str:
    return (
        "# Written by `cbmflow stack up` at every start.\n"
        f"listeners.tcp.default = {HOST}:{inst['amqp_port']}\n"
        f"management.tcp.ip = {HOST}\n"
        f"management.tcp.port = {inst['management_port']}\n"
        # A job holds its message unacked for its whole run; the broker must not cut it off first.
        f"consumer_timeout = {inst['consumer_timeout_ms']}\n"
        "loopback_users.guest = true\n"
        # Fresher queue figures for `cbmflow status` and the provisioner (default 5000 ms).
        "collect_statistics_interval = 1000\n"
        "log.console = false\n"
        "log.file.level = info\n"
    )


def _rabbit_pid(base_dir: Path) -> int | None:
    try:
        pid = int((base_dir / "run" / "rabbitmq.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _proc_alive(pid, "beam.smp") else None


def _management_ok(port: int, auth: tuple[str, str]) -> bool:
    try:
        resp = requests.get(f"http://{HOST}:{port}/api/overview", auth=auth, timeout=2)
    except requests.RequestException:
        return False
    return resp.status_code == 200


def _ensure_rabbit_user(port: int, user: str, password: str) -> None:
    """Create or update the stack's admin user through the management API.

    HTTP rather than rabbitmqctl because every rabbitmqctl call boots an Erlang VM (~1 s). The
    built-in guest account (loopback-only by default) bootstraps it and is left in place.
    """
    base = f"http://{HOST}:{port}/api"
    body = {"password": password, "tags": "administrator"}
    perms = {"configure": ".*", "write": ".*", "read": ".*"}
    last: requests.Response | None = None
    for auth in ((user, password), ("guest", "guest")):
        last = requests.put(f"{base}/users/{user}", json=body, auth=auth, timeout=10)
        if last.status_code in (200, 201, 204):
            resp = requests.put(f"{base}/permissions/%2F/{user}", json=perms, auth=auth, timeout=10)
            resp.raise_for_status()
            return
    assert last is not None
    raise StackError(f"could not create RabbitMQ user {user}: HTTP {last.status_code} {last.text[:200]}")


def rabbitmqctl(base_dir: Path, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run rabbitmqctl against the node in ``base_dir``, as its user and with its cookie and epmd."""
    _require(RABBIT_BIN / "rabbitmqctl", "rabbitmq-server")
    base_dir = base_dir.absolute()
    inst = _load_json(base_dir / INSTANCE_JSON)
    if inst is None:
        raise StackError(f"no RabbitMQ node in {base_dir}")
    user = _resolve_user(str(inst.get("run_as", "nobody")))
    return _run(
        [str(RABBIT_BIN / "rabbitmqctl"), "-n", str(inst["nodename"]), *args],
        user,
        _rabbit_env(base_dir, inst),
        base_dir,
        timeout_s,
    )


def start_rabbitmq(
    base_dir: Path,
    amqp_port: int,
    management_port: int,
    dist_port: int,
    epmd_port: int,
    run_as: str,
    consumer_timeout_ms: int,
    *,
    timeout_s: float = 90.0,
) -> RabbitInfo:
    """Start (unless running) a RabbitMQ node with the management plugin and return it.

    The node name embeds the AMQP port so two stacks on one machine never clash; the admin user
    ``cbmflow`` gets a generated password kept in ``instance.json``.
    """
    for binary in ("rabbitmq-server", "rabbitmqctl"):
        _require(RABBIT_BIN / binary, "rabbitmq-server")
    base_dir = base_dir.absolute()
    user = _resolve_user(run_as)
    if not base_dir.exists():
        base_dir.mkdir(parents=True)
        base_dir.chmod(0o755)
    _check_traversable(base_dir, user)
    inst_path = base_dir / INSTANCE_JSON
    old = _load_json(inst_path) or {}
    pid = _rabbit_pid(base_dir)
    wanted = {
        "amqp_port": amqp_port,
        "management_port": management_port,
        "dist_port": dist_port,
        "epmd_port": epmd_port,
        "consumer_timeout_ms": consumer_timeout_ms,
    }
    started = pid is None
    if pid is not None:
        if "nodename" not in old:
            raise StackError(f"a RabbitMQ node (pid {pid}) runs from {base_dir} but {inst_path} is missing: stop it")
        inst = old
        differs = {k: (v, inst.get(k)) for k, v in wanted.items() if inst.get(k) != v}
        if differs:
            log.warning("stack.rabbit_settings_differ", differs=differs, hint="stack down; stack up to apply")
        log.info("stack.rabbit_already_running", pid=pid, amqp_port=inst["amqp_port"])
    else:
        inst = {
            **wanted,
            "password": old.get("password") or secrets.token_urlsafe(24),
            "user": RABBIT_USER,
            "nodename": f"cbmflow{amqp_port}@localhost",
            "run_as": user.name,
        }
        _write_private(inst_path, json.dumps(inst, indent=2))
        _require_free(
            {
                "CBMFLOW_STACK_AMQP_PORT": amqp_port,
                "CBMFLOW_STACK_MANAGEMENT_PORT": management_port,
                "CBMFLOW_STACK_DIST_PORT": dist_port,
            }
        )
        for sub in ("home", "etc", "mnesia", "log", "run"):
            _mkdir_owned(base_dir / sub, user, 0o700)
        (base_dir / "run" / "rabbitmq.pid").unlink(missing_ok=True)
        etc = base_dir / "etc"
        (etc / "rabbitmq-env.conf").write_text("# empty on purpose: /etc/rabbitmq/rabbitmq-env.conf is not ours\n")
        (etc / "rabbitmq.conf").write_text(_rabbit_conf(inst))
        if user.switch:
            for f in etc.iterdir():
                os.chown(f, user.uid, user.gid)
        pid = _launch_rabbit(base_dir, inst, user, timeout_s)
        log.info(
            "stack.rabbit_started",
            pid=pid,
            nodename=inst["nodename"],
            amqp_port=amqp_port,
            management_port=management_port,
            run_as=user.name,
        )
    _ensure_rabbit_user(int(inst["management_port"]), str(inst["user"]), str(inst["password"]))
    return RabbitInfo(
        base_dir=base_dir,
        log_dir=base_dir / "log",
        host=HOST,
        amqp_port=int(inst["amqp_port"]),
        management_port=int(inst["management_port"]),
        dist_port=int(inst["dist_port"]),
        epmd_port=int(inst["epmd_port"]),
        nodename=str(inst["nodename"]),
        user=str(inst["user"]),
        password=str(inst["password"]),
        pid=pid,
        run_as=str(inst.get("run_as", user.name)),
        consumer_timeout_ms=int(inst["consumer_timeout_ms"]),
        started=started,
    )


def _launch_rabbit(base_dir: Path, inst: dict[str, Any], user: _User, timeout_s: float) -> int:
    """Start the node detached (own session) so it outlives ``cbmflow stack up``; wait until both
    the management API and the AMQP port answer, because either alone is not "ready"."""
    console_log = base_dir / "log" / "console.log"
    kwargs: dict[str, Any] = {}
    if user.switch:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
    with console_log.open("ab") as out:
        if user.switch:
            os.chown(console_log, user.uid, user.gid)
        proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=_rabbit_env(base_dir, inst),
            cwd=base_dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
    deadline = time.monotonic() + timeout_s
    mport, aport = int(inst["management_port"]), int(inst["amqp_port"])
    while True:
        rc = proc.poll()
        if rc is not None:
            raise StackError(
                f"rabbitmq-server exited with {rc} during start\n--- {console_log}:\n{_tail(console_log)}\n"
                f"--- node log:\n{_tail(base_dir / 'log' / (str(inst['nodename']) + '.log'))}"
            )
        if _accepts(aport, 0.5) and _management_ok(mport, ("guest", "guest")):
            break
        if time.monotonic() > deadline:
            _stop_rabbit_pids(base_dir, proc.pid)
            raise StackError(
                f"RabbitMQ not ready after {timeout_s:.0f} s\n--- {console_log}:\n{_tail(console_log)}\n"
                f"--- node log:\n{_tail(base_dir / 'log' / (str(inst['nodename']) + '.log'))}"
            )
        time.sleep(0.2)
    pid = _rabbit_pid(base_dir)
    if pid is None:
        raise StackError(f"RabbitMQ answers but wrote no pid file in {base_dir / 'run'}")
    return pid


def _stop_rabbit_pids(base_dir: Path, wrapper_pid: int | None = None) -> None:
    """Last resort: SIGTERM, then SIGKILL the node and its launcher script."""
    pid = _rabbit_pid(base_dir)
    if pid is not None:
        _kill(pid, "beam.smp", signal.SIGTERM)
        if not _wait_gone(pid, "beam.smp", 10):
            _kill(pid, "beam.smp", signal.SIGKILL)
            _wait_gone(pid, "beam.smp", 5)
    if wrapper_pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(wrapper_pid, signal.SIGKILL)


def _epmd_names(port: int) -> list[str] | None:
    """Node names registered with the epmd on ``port`` (NAMES_REQ), or None if none answers."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(b"\x00\x01n")
            chunks = []
            while data := s.recv(4096):
                chunks.append(data)
    except OSError:
        return None
    text = b"".join(chunks)[4:].decode(errors="replace")
    return [line.split()[1] for line in text.splitlines() if line.startswith("name ")]


def _stop_epmd(port: int) -> None:
    """Kill the epmd on our private port once no node uses it; epmd outlives its nodes otherwise."""
    deadline = time.monotonic() + 3
    names = _epmd_names(port)
    while names and time.monotonic() < deadline:  # the node's registration goes with its socket
        time.sleep(0.1)
        names = _epmd_names(port)
    if names:
        log.info("stack.epmd_kept", port=port, nodes=names)
        return
    for pid in pids_listening_on(port):
        if _proc_alive(pid, "epmd"):
            _kill(pid, "epmd", signal.SIGTERM)
            if not _wait_gone(pid, "epmd", 3):
                _kill(pid, "epmd", signal.SIGKILL)
            log.info("stack.epmd_stopped", pid=pid, port=port)


def stop_rabbitmq(base_dir: Path, *, timeout_s: float = 60.0) -> bool:
    """Stop the node in ``base_dir`` (``rabbitmqctl stop``, which waits for it to exit) and its epmd.

    Returns whether the node was running.
    """
    base_dir = base_dir.absolute()
    inst = _load_json(base_dir / INSTANCE_JSON)
    if inst is None:
        return False
    pid = _rabbit_pid(base_dir)
    if pid is not None:
        try:
            res = rabbitmqctl(base_dir, "stop", str(base_dir / "run" / "rabbitmq.pid"), timeout_s=timeout_s)
            if res.returncode != 0:
                log.warning("stack.rabbitmqctl_stop_failed", rc=res.returncode, stderr=res.stderr[-500:])
        except (OSError, subprocess.TimeoutExpired, StackError) as exc:
            log.warning("stack.rabbitmqctl_stop_failed", error=str(exc))
        if not _wait_gone(pid, "beam.smp", 10):
            log.warning("stack.rabbit_forced_stop", pid=pid)
            _stop_rabbit_pids(base_dir)
        log.info("stack.rabbit_stopped", pid=pid, nodename=inst.get("nodename"))
    _stop_epmd(int(inst["epmd_port"]))
    (base_dir / "run" / "rabbitmq.pid").unlink(missing_ok=True)
    return pid is not None


def rabbitmq_status(base_dir: Path) -> dict[str, Any]:
    base_dir = base_dir.absolute()
    inst = _load_json(base_dir / INSTANCE_JSON) or {}
    pid = _rabbit_pid(base_dir)
    aport = inst.get("amqp_port")
    mport = inst.get("management_port")
    return {
        "running": pid is not None and isinstance(aport, int) and _accepts(aport),
        "management_running": pid is not None
        and isinstance(mport, int)
        and _management_ok(mport, (str(inst.get("user")), str(inst.get("password")))),
        "pid": pid,
        "host": HOST,
        "amqp_port": aport,
        "management_port": mport,
        "dist_port": inst.get("dist_port"),
        "epmd_port": inst.get("epmd_port"),
        "nodename": inst.get("nodename"),
        "run_as": inst.get("run_as"),
        "consumer_timeout_ms": inst.get("consumer_timeout_ms"),
        "console_url": f"http://{HOST}:{mport}/" if mport else None,
        "log_dir": str(base_dir / "log"),
    }


# --------------------------------------------------------------------------------------------
# The stack as a whole
# --------------------------------------------------------------------------------------------


def _summary(pg: PgInfo, rabbit: RabbitInfo) -> dict[str, Any]:
    return {
        "dsn": pg.dsn,
        "amqp_url": rabbit.amqp_url,
        "management_url": rabbit.management_url,
        "console_url": rabbit.console_url,
        "postgres": pg.public(),
        "rabbitmq": rabbit.public(),
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def system_home(state_dir: Path, settings: StackSettings | None = None) -> Path:
    """The per-state-directory place under ``data_root``: the checkout's name for people, a hash
    of the state directory's absolute path so two checkouts of the same name never share one."""
    settings = settings or StackSettings()
    state_dir = state_dir.absolute()
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", state_dir.parent.name).strip("_") or "stack"
    return Path(settings.data_root).absolute() / f"{name}-{digest}"


def data_home(state_dir: Path, settings: StackSettings | None = None, *, starting: bool = False) -> Path:
    """Where postgres/ and rabbitmq/ of this state directory live: the state directory itself,
    unless run_as cannot reach it (see the module docstring).

    Once made, the choice sticks: the ``stack-home`` record wins, then servers already set up in
    the state directory. Only ``starting`` a fresh stack decides anew; without it (status, down)
    an undecided stack is looked for in the state directory.
    """
    state_dir = state_dir.absolute()
    recorded = state_dir / STACK_HOME
    with contextlib.suppress(FileNotFoundError):
        text = recorded.read_text().strip()
        if text:
            return Path(text)
    if not starting or any((state_dir / d / INSTANCE_JSON).exists() for d in (PG_DIR, RABBIT_DIR)):
        return state_dir
    settings = settings or StackSettings()
    user = _resolve_user(settings.run_as)
    if not user.switch or _blocking_dir(state_dir, user) is None:
        return state_dir
    return system_home(state_dir, settings)


def _make_home(home: Path, state_dir: Path, user: _User) -> None:
    """Create a home under ``data_root`` (parents 0755, so run_as can traverse them; the servers'
    own directories are handed to run_as by start_postgres/start_rabbitmq) and record it."""
    missing = [d for d in [home, *home.parents] if not d.exists()]
    for d in reversed(missing):
        d.mkdir()
        d.chmod(0o755)
    _check_traversable(home, user)
    _write_private(state_dir / STACK_HOME, f"{home}\n", mode=0o644)
    log.info("stack.data_elsewhere", state_dir=str(state_dir), data_home=str(home), run_as=user.name)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise up/down on one state directory (``make demo`` next to a manual ``stack up``)."""
    import fcntl

    with (state_dir / ".stack.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def up(state_dir: Path, settings: StackSettings | None = None) -> dict[str, Any]:
    """Bring the local stack up (idempotent) and record DSN and URLs in ``stack.json``.

    Both servers start in parallel: RabbitMQ's boot (~3 s) dominates and hides initdb.
    Returns what was written to ``stack.json``; ``postgres.started``/``rabbitmq.started`` say
    whether this call started them or found them running.
    """
    settings = settings or StackSettings()
    state_dir = state_dir.absolute()
    if not state_dir.exists():
        state_dir.mkdir(parents=True)
        state_dir.chmod(0o755)
    with _locked(state_dir), ThreadPoolExecutor(max_workers=2, thread_name_prefix="stack") as pool:
        home = data_home(state_dir, settings, starting=True)
        if home != state_dir:
            _make_home(home, state_dir, _resolve_user(settings.run_as))
        pg_f = pool.submit(
            start_postgres,
            home / PG_DIR,
            settings.pg_port,
            settings.run_as,
            settings.db_name,
            settings.db_user,
        )
        rb_f = pool.submit(
            start_rabbitmq,
            home / RABBIT_DIR,
            settings.amqp_port,
            settings.management_port,
            settings.dist_port,
            settings.epmd_port,
            settings.run_as,
            settings.consumer_timeout_ms,
        )
        errors = [e for e in (pg_f.exception(), rb_f.exception()) if e is not None]
        if errors:
            raise errors[0]
        data = {**_summary(pg_f.result(), rb_f.result()), "data_home": str(home)}
        _write_private(state_dir / STACK_JSON, json.dumps(data, indent=2) + "\n")
    log.info("stack.up", state_dir=str(state_dir), pg_port=data["postgres"]["port"], console=data["console_url"])
    return data


def stop_workers(state_dir: Path, grace_s: float | None = None) -> list[str]:
    """Drain the local driver's workers of this state directory, killing those still running
    after ``grace_s`` (default ``StackSettings.worker_grace_s``); returns the ids that were running.

    They are stopped before the servers, while a job in flight can still be requeued, because a
    worker outliving its broker and database would only retry them (docs/worker.md).
    """
    from provisioner.drivers.local import LocalDriver

    grace = StackSettings().worker_grace_s if grace_s is None else grace_s
    stopped = LocalDriver(state_dir.absolute() / "workers", userdata="").stop(grace_s=grace)
    if stopped:
        log.info("stack.workers_stopped", state_dir=str(state_dir), workers=stopped)
    return stopped


def down(state_dir: Path) -> dict[str, Any]:
    """Stop the state directory's local workers, then both servers, keeping their data;
    ``stack.json`` goes so nothing points at a dead stack.

    Returns which servers were running (``postgres``, ``rabbitmq``) and the workers stopped.
    """
    state_dir = state_dir.absolute()
    if not state_dir.is_dir():
        return {"postgres": False, "rabbitmq": False, "workers": []}
    workers = stop_workers(state_dir)
    home = data_home(state_dir)
    with _locked(state_dir), ThreadPoolExecutor(max_workers=2, thread_name_prefix="stack") as pool:
        pg_f = pool.submit(stop_postgres, home / PG_DIR)
        rb_f = pool.submit(stop_rabbitmq, home / RABBIT_DIR)
        result: dict[str, Any] = {"postgres": pg_f.result(), "rabbitmq": rb_f.result(), "workers": workers}
        (state_dir / STACK_JSON).unlink(missing_ok=True)
    log.info("stack.down", state_dir=str(state_dir), data_home=str(home), **result)
    return result


def status(state_dir: Path) -> dict[str, Any]:
    """What runs where, from the processes and ports themselves rather than from ``stack.json``."""
    state_dir = state_dir.absolute()
    home = data_home(state_dir)
    pg = postgres_status(home / PG_DIR)
    rb = rabbitmq_status(home / RABBIT_DIR)
    recorded = _load_json(state_dir / STACK_JSON) or {}
    return {
        "state_dir": str(state_dir),
        "data_home": str(home),
        "running": bool(pg["running"] and rb["running"] and rb["management_running"]),
        "dsn": recorded.get("dsn"),
        "amqp_url": recorded.get("amqp_url"),
        "management_url": recorded.get("management_url"),
        "console_url": rb["console_url"],
        "postgres": pg,
        "rabbitmq": rb,
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

app = typer.Typer(
    help="Start, stop and inspect the local PostgreSQL + RabbitMQ stack (127.0.0.1 only).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    try:
        yield
    except StackError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _print_table(st: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    pg, rb = st["postgres"], st["rabbitmq"]

    def state(flag: bool) -> str:
        return "[green]running[/green]" if flag else "[red]stopped[/red]"

    def addr(port: Any) -> str:
        return f"{HOST}:{port}" if port else "-"

    table = Table(title=f"cbmflow local stack ({st['state_dir']})")
    for col in ("service", "state", "listens on", "pid", "runs as"):
        table.add_column(col)
    table.add_row("PostgreSQL", state(pg["running"]), addr(pg["port"]), str(pg["pid"] or "-"), str(pg["run_as"] or "-"))
    table.add_row(
        "RabbitMQ AMQP", state(rb["running"]), addr(rb["amqp_port"]), str(rb["pid"] or "-"), str(rb["run_as"] or "-")
    )
    table.add_row(
        "RabbitMQ console",
        state(rb["management_running"]),
        addr(rb["management_port"]),
        str(rb["pid"] or "-"),
        str(rb["run_as"] or "-"),
    )
    table.add_row("Erlang distribution", "", addr(rb["dist_port"]), "", "")
    table.add_row("epmd", "", addr(rb["epmd_port"]), "", "")
    console = Console()
    console.print(table)
    console.print(f"RabbitMQ console: {rb['console_url'] or '-'}  (user {RABBIT_USER}, node {rb['nodename'] or '-'})")
    console.print(f"PostgreSQL: database {pg['db_name'] or '-'}, user {pg['db_user'] or '-'}, data {pg['data_dir']}")
    console.print(f"consumer_timeout: {rb['consumer_timeout_ms'] or '-'} ms; logs: {pg['log_file']}, {rb['log_dir']}")
    if st["data_home"] != st["state_dir"]:
        console.print(
            f"server data: {st['data_home']} (the state directory is private to its owner; the servers run as"
            f" {pg['run_as'] or rb['run_as'] or '-'} and keep their data there), recorded in"
            f" {Path(st['state_dir']) / STACK_HOME}"
        )
    else:
        console.print(f"server data: {st['data_home']} (the state directory)")
    if st["running"]:
        console.print(f"credentials: {Path(st['state_dir']) / STACK_JSON} (or `cbmflow stack status --json`)")
    else:
        console.print("not (fully) up: run `cbmflow stack up`")


@app.command("up")
def up_cmd() -> None:
    """Start PostgreSQL and RabbitMQ (idempotent: a running stack is reported, a crashed one restarted)."""
    with _cli_errors():
        data = up(state_dir(), StackSettings())
    for name in ("postgres", "rabbitmq"):
        verb = "started" if data[name]["started"] else "already running"
        typer.echo(f"{name}: {verb} (pid {data[name]['pid']})")
    _print_table(status(state_dir()))


@app.command("down")
def down_cmd() -> None:
    """Stop both servers; their data stays for the next `stack up`."""
    with _cli_errors():
        result = down(state_dir())
    workers = result.pop("workers")
    typer.echo(f"local workers: {len(workers)} stopped" + (f" ({', '.join(workers)})" if workers else ""))
    for name, was_running in result.items():
        typer.echo(f"{name}: {'stopped' if was_running else 'was not running'}")


@app.command("status")
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with credentials in the URLs)."),
) -> None:
    """Show what runs where, including the RabbitMQ console URL."""
    st = status(state_dir())
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    else:
        _print_table(st)
