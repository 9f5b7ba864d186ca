"""The embedded driver: workers are processes on this machine, booted from rendered user-data.

It exists so the whole chain (demo, tests, a single-host deployment) runs the same provisioning
path as a cloud: the environment and command come from ``parse_worker_launch`` of the very
user-data a VM would receive. State lives in files, not in this object, because every
``cbmflow provision`` invocation is a new process: ``<dir>/<id>.pid`` holds the pid and the kernel
start time (so a recycled pid is never mistaken for a worker), ``<id>.log`` the output, and
``<id>.draining`` marks a worker already told to stop.

Pools share the directory (``cbmflow stack down`` stops every worker in it) and are told apart by
the id: ``local-<8 hex>`` for the pool named ``default``, ``local-<pool>-<8 hex>`` for any other.
A driver made for one pool lists, drains and deletes only ids of that form; one made without a
pool (``stop``, the demo's clean-up) sees them all.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cbmflow.logging import get_logger
from cbmflow.settings import state_dir
from provisioner import registry
from provisioner.drivers import refuse_orphans_start
from provisioner.policy import WorkerView
from provisioner.userdata import parse_worker_launch

log = get_logger("provisioner")

DEFAULT_POOL = "default"

# Workers started by this process, whichever driver object started them, so they are reaped (no
# zombies, no ResourceWarning) when the provisioner lives on, as in the demo; any other process
# finds them through /proc instead.
_CHILDREN: dict[str, subprocess.Popen[bytes]] = {}


def started_here() -> list[str]:
    """Ids of the workers this process started and that have not been seen to exit."""
    return list(_CHILDREN)


def local_worker_command() -> list[str]:
    """This interpreter's ``cbmflow worker``: the venv's console script, else ``python -m cbmflow``."""
    script = Path(sys.executable).parent / "cbmflow"
    if script.exists():
        return [str(script), "worker"]
    return [sys.executable, "-m", "cbmflow", "worker"]


def worker_id_prefix(pool: str) -> str:
    """``local-`` for the default pool (the ids workers always had), ``local-<pool>-`` for the others."""
    return "local-" if pool == DEFAULT_POOL else f"local-{pool}-"


def _id_pattern(pool: str) -> re.Pattern[str]:
    return re.compile(re.escape(worker_id_prefix(pool)) + r"[0-9a-f]{8}")


def pool_of_id(worker_id: str) -> str:
    """The pool a local worker was started for, read back from its id."""
    middle = worker_id.removeprefix("local-")[:-9]  # what is left of "-<8 hex>"
    return middle or DEFAULT_POOL


def _proc_start_ticks(pid: int) -> int | None:
    """Kernel start time of a live, non-zombie process, or None; a zombie is reaped if it is ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after the last ')' don't.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return int(fields[19])


class LocalDriver:
    def __init__(
        self,
        workers_dir: Path | None = None,
        *,
        userdata: str | Callable[[], str],
        dsn: str | None = None,
        pool: str | None = None,
        orphans_of: Sequence[str] | None = None,
    ) -> None:
        """``userdata`` may be a callable so that listing and draining never need the secrets resolved.

        ``pool`` None: every worker of the directory (clean-up); a name: only that pool's workers.
        ``orphans_of`` (the configured pool names, with ``pool`` None): only the workers of no
        configured pool, left behind by a renamed or removed pool.
        """
        if pool is not None and orphans_of is not None:
            raise ValueError("a driver sees one pool's workers or the orphans, not both")
        self.workers_dir = workers_dir or state_dir() / "workers"
        self._userdata = userdata
        self.dsn = dsn
        self.pool = pool
        self._mine = None if pool is None else _id_pattern(pool)
        self._configured = [_id_pattern(name) for name in orphans_of or ()]
        self._orphans = orphans_of is not None

    def owns(self, worker_id: str) -> bool:
        """Whether this driver's pool holds the worker (always, without a pool; for the orphans'
        driver, when no configured pool does)."""
        if self._orphans:
            return not any(p.fullmatch(worker_id) for p in self._configured)
        return self._mine is None or self._mine.fullmatch(worker_id) is not None

    # ---- files ------------------------------------------------------------------------------
    def _pid_path(self, worker_id: str) -> Path:
        return self.workers_dir / f"{worker_id}.pid"

    def _marker(self, worker_id: str) -> Path:
        return self.workers_dir / f"{worker_id}.draining"

    def log_path(self, worker_id: str) -> Path:
        return self.workers_dir / f"{worker_id}.log"

    def _live_pid(self, worker_id: str) -> int | None:
        """The worker's pid while its process lives; forgets the worker once it is gone."""
        path = self._pid_path(worker_id)
        try:
            pid_text, ticks_text = path.read_text().split()
            pid, ticks = int(pid_text), int(ticks_text)
        except (FileNotFoundError, ValueError):
            return None
        child = _CHILDREN.get(worker_id)
        if child is not None and child.poll() is not None:
            del _CHILDREN[worker_id]
        elif _proc_start_ticks(pid) == ticks:
            return pid
        path.unlink(missing_ok=True)
        self._marker(worker_id).unlink(missing_ok=True)
        return None

    # ---- the driver port --------------------------------------------------------------------
    def list_workers(self) -> list[WorkerView]:
        if not self.workers_dir.is_dir():
            return []
        live: list[tuple[str, int, float]] = []
        for path in sorted(self.workers_dir.glob("*.pid")):
            worker_id = path.stem
            if not self.owns(worker_id):
                continue
            pid = self._live_pid(worker_id)
            if pid is not None:
                live.append((worker_id, pid, path.stat().st_mtime))
        rows = registry.read(self.dsn, [w[0] for w in live])
        views = []
        for worker_id, pid, started_at_s in live:
            row = rows.get(worker_id) if rows is not None else None
            marker = self._marker(worker_id)
            draining_since = marker.stat().st_mtime if marker.exists() else None
            if row is not None and row.state == "stopped":
                state = "stopped"
            elif draining_since is not None:
                state = "draining"
            elif rows is None:
                state = "unknown"
            elif row is not None:
                state = row.state
            else:
                state = "starting"
            views.append(
                WorkerView(
                    id=worker_id,
                    state=state,
                    started_at_s=started_at_s,
                    pid=pid,
                    current_scene=row.current_scene if row else None,
                    heartbeat_age_s=row.heartbeat_age_s if row else None,
                    detail=str(self.log_path(worker_id)),
                    registered=None if rows is None else row is not None,
                    server_status="running",
                    draining_since_s=draining_since,
                    pool=pool_of_id(worker_id),
                )
            )
        return views

    def start(self, n: int) -> list[str]:
        if n <= 0:
            return []
        if self._orphans:
            refuse_orphans_start()
        userdata = self._userdata() if callable(self._userdata) else self._userdata
        file_env, command = parse_worker_launch(userdata)
        self.workers_dir.mkdir(parents=True, exist_ok=True)
        started = []
        for _ in range(n):
            worker_id = f"{worker_id_prefix(self.pool or DEFAULT_POOL)}{secrets.token_hex(4)}"
            env = {
                # Local workers share this machine's cores: one core each (decode and reduce take
                # turns) scales with their number, where each using every core would oversubscribe
                # them (docs/worker.md, "Cores"). An explicit CBMFLOW_WORKER_THREADS wins.
                "CBMFLOW_WORKER_THREADS": "1",
                **os.environ,
                **file_env,
                # Their stderr is a log file that tools (and the fault tests) read line by line as
                # JSON, whatever format the provisioner's own terminal asked for.
                "CBMFLOW_LOG_FORMAT": "json",
                "CBMFLOW_WORKER_ID": worker_id,
                "CBMFLOW_STATE_DIR": str(state_dir()),
            }
            with open(self.log_path(worker_id), "ab") as out:
                # A session of its own: a Ctrl-C in the provisioner's terminal must not reach the
                # workers, which are stopped only through a drain.
                proc = subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            ticks = _proc_start_ticks(proc.pid)
            if ticks is None:
                rc = proc.wait()
                log.error(
                    "provision.start_failed", worker_id=worker_id, returncode=rc, log=str(self.log_path(worker_id))
                )
                continue
            tmp = self._pid_path(worker_id).with_suffix(".pid.tmp")
            tmp.write_text(f"{proc.pid} {ticks}\n")
            tmp.replace(self._pid_path(worker_id))
            _CHILDREN[worker_id] = proc
            log.info("provision.started", worker_id=worker_id, pid=proc.pid, log=str(self.log_path(worker_id)))
            started.append(worker_id)
        return started

    def drain(self, ids: list[str]) -> list[str]:
        """SIGTERM: the worker stops consuming, finishes or requeues its job, and exits 0."""
        signalled = []
        for worker_id in ids:
            pid = self._live_pid(worker_id) if self.owns(worker_id) else None
            if pid is None:
                continue
            self._marker(worker_id).touch()
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            log.info("provision.drain", worker_id=worker_id, pid=pid)
            signalled.append(worker_id)
        return signalled

    def delete(self, ids: list[str]) -> list[str]:
        """SIGKILL the whole session: only for workers that never registered, exited or hung in a drain."""
        killed = []
        for worker_id in ids:
            pid = self._live_pid(worker_id) if self.owns(worker_id) else None
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the worker leads its own session (start_new_session)
                killed.append(worker_id)
                log.info("provision.deleted", worker_id=worker_id, pid=pid)
            child = _CHILDREN.pop(worker_id, None)
            if child is not None:
                child.wait(timeout=10)
            self._pid_path(worker_id).unlink(missing_ok=True)
            self._marker(worker_id).unlink(missing_ok=True)
        return killed

    def down(self) -> list[str]:
        return self.drain([w.id for w in self.list_workers()])

    def stop(self, ids: list[str] | None = None, grace_s: float = 30.0) -> list[str]:
        """Drain these workers (all of this directory's when None), wait up to ``grace_s`` for them
        to exit, then kill those left; returns the ids that were running.

        For when the broker and the database are about to go (``cbmflow stack down``, the end of
        the demo): a worker left behind would retry them until its unreachable-exit deadline.
        Draining first lets a job in flight be requeued cleanly while the broker still answers.
        """
        targets = [w.id for w in self.list_workers()] if ids is None else ids
        drained = self.drain(targets)
        left = self.wait_gone(drained, grace_s)
        if left:
            log.warning("provision.stop_grace_passed", workers=left, grace_s=grace_s)
            self.delete(left)
        return drained

    def headroom(self) -> int | None:
        """No quota for processes; ``max_workers`` is the only bound."""
        return None

    def wait_gone(self, ids: list[str], timeout_s: float) -> list[str]:
        """Wait until these workers have exited; returns those still running at the deadline."""
        deadline = time.monotonic() + timeout_s
        remaining = list(ids)
        while remaining:
            remaining = [w for w in remaining if self._live_pid(w) is not None]
            if not remaining or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        return remaining
