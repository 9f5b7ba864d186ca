"""Provisioning as functions: the control step of each pool, its driver, its user-data.

The CLI (``cbmflow provision``), the demo and the tests all call these; none of them lives in a
command module, so running a step never needs typer. A "pool" here is a ``ProvisionSettings``
whose ``pools`` is empty (``ProvisionSettings.resolved_pools()``, checked by
``provisioner.pools.resolve``): the functions that take one step or make one driver take one.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbmflow.errors import CbmflowError, ConfigError
from cbmflow.logging import get_logger
from cbmflow.settings import DbSettings, ProvisionSettings, state_dir
from provisioner import pools as poolsmod
from provisioner.controller import Applied, Controller, FileHistory
from provisioner.drivers import WorkerDriver
from provisioner.policy import Plan, Policy, WorkerView, decide
from provisioner.pools import Pool

log = get_logger("provisioner")

DRIVERS = ("local", "openstack")


def _optional_dsn() -> str | None:
    try:
        return DbSettings().resolved_dsn()
    except ConfigError:
        return None


def base_config(settings: ProvisionSettings) -> dict[str, Any] | None:
    """The operator's own cloud-config (``userdata_template``), merged under the worker's pieces."""
    if not settings.userdata_template:
        return None
    import yaml

    path = Path(settings.userdata_template)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"CBMFLOW_PROVISION_USERDATA_TEMPLATE {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"CBMFLOW_PROVISION_USERDATA_TEMPLATE {path}: not a cloud-config mapping")
    return doc


def server_userdata(settings: ProvisionSettings, name: str) -> str:
    """The user-data of the VM called ``name`` of the pool ``settings``: the worker environment,
    the pool's job kinds and environment, and its own worker id.

    The id is the server name so that the registry row and the server join without guessing
    (a host name can be rewritten by the image; a pid changes on every restart).
    """
    from provisioner.userdata import pool_env, render_userdata, resolve_install, worker_env

    env = {**worker_env(), **pool_env(settings), "CBMFLOW_WORKER_ID": name}
    return render_userdata(
        env,
        install=resolve_install(settings.install, settings.wheel_url),
        wheel_url=settings.wheel_url,
        index_url=settings.index_url,
        base_config=base_config(settings),
    )


def make_driver(settings: ProvisionSettings) -> WorkerDriver:
    """The driver of one pool: it sees, starts and removes that pool's workers only."""
    settings = _one_pool(settings).settings
    if settings.driver == "local":
        from provisioner.drivers.local import LocalDriver, local_worker_command
        from provisioner.userdata import pool_env, render_userdata, worker_env

        def userdata() -> str:
            env = {**worker_env(remote=False), **pool_env(settings)}
            return render_userdata(env, worker_command=local_worker_command())

        return LocalDriver(state_dir() / "workers", userdata=userdata, dsn=_optional_dsn(), pool=settings.pool)
    if settings.driver == "openstack":
        from provisioner.drivers.openstack import OpenStackDriver

        return OpenStackDriver(settings, userdata=lambda name: server_userdata(settings, name), dsn=_optional_dsn())
    raise ConfigError(f"CBMFLOW_PROVISION_DRIVER {settings.driver!r}: use one of {', '.join(DRIVERS)}")


def orphan_driver(settings: ProvisionSettings | None = None) -> WorkerDriver:
    """A driver over the workers of no configured pool: those a renamed or removed pool left
    running, which no pool's step lists, drains or deletes. It never starts any."""
    settings = settings or ProvisionSettings()
    configured = [p.name for p in poolsmod.resolve(settings)]
    if settings.driver == "local":
        from provisioner.drivers.local import LocalDriver

        return LocalDriver(state_dir() / "workers", userdata="", dsn=_optional_dsn(), orphans_of=configured)
    if settings.driver == "openstack":
        from provisioner.drivers.openstack import OpenStackDriver

        return OpenStackDriver(settings, userdata=lambda _name: "", dsn=_optional_dsn(), orphans_of=configured)
    raise ConfigError(f"CBMFLOW_PROVISION_DRIVER {settings.driver!r}: use one of {', '.join(DRIVERS)}")


def reap_orphans(settings: ProvisionSettings | None = None, driver: WorkerDriver | None = None) -> list[WorkerView]:
    """Delete the orphans whose worker has stopped; return those still alive.

    Only a stop recorded in this deployment's registry counts: a server tagged ``cbmflow-worker``
    that our registry does not know may belong to another deployment in the same project, so a
    live orphan is reported (``provision.orphans``), and drained only on the operator's word
    (``cbmflow provision down --orphans``). Once drained, its worker stops and the next step
    deletes the server.
    """
    driver = driver or orphan_driver(settings)
    workers = driver.list_workers()
    stopped = [w.id for w in workers if w.state == "stopped"]
    if stopped:
        deleted = driver.delete(stopped)
        log.info("provision.orphans_deleted", workers=deleted)
    alive = [w for w in workers if w.state != "stopped"]
    if alive:
        log.warning(
            "provision.orphans",
            workers=[w.id for w in alive],
            pools=sorted({w.pool for w in alive}),
            hint="their pool is not configured: `cbmflow provision down --orphans` drains them",
        )
    return alive


def _pool_key(settings: ProvisionSettings) -> str:
    return f"{settings.driver}-{settings.pool}"


@contextmanager
def _scale_lock(settings: ProvisionSettings) -> Iterator[None]:
    """One control step per pool at a time: two overlapping steps would both boot the same shortfall."""
    path = state_dir() / f"provision-{_pool_key(settings)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def queue_backlogs(queues: Sequence[str]) -> dict[str, int]:
    """Ready + unacknowledged jobs of each queue, without the management API's sampling lag for ready ones.

    The management API refreshes every ~5 s, so right after the watcher published a batch it can
    still read 0 and a single control step would start nothing. The AMQP passive declare sees ready
    messages at once; unacknowledged ones (only visible to the management API) are by definition
    already with a worker, so their lag cannot hide work from an empty fleet. Either source alone is
    enough to scale on, so one being unavailable is logged, not fatal; a queue neither can read is.
    """
    import pika.exceptions

    from cbmflow import bus as busmod
    from cbmflow.settings import BusSettings

    settings = BusSettings()
    sampled: dict[str, int] = {}
    unacked: dict[str, int] = {}
    for queue in queues:
        try:
            depth = busmod.queue_depth(settings, queue=queue)
            sampled[queue], unacked[queue] = depth.backlog, depth.unacked
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - HTTP errors, and odd replies for a queue not yet sampled
            log.warning(
                "provision.management_depth_unavailable", queue=queue, error=f"{type(exc).__name__}: {exc}"[:300]
            )
    ready: dict[str, int] = {}
    try:
        conn = busmod.connect(settings)
        try:
            for queue in queues:
                try:
                    # A channel per queue: a passive declare of a missing queue closes its channel.
                    ready[queue], _ = busmod.passive_depth(conn.channel(), settings, queue=queue)
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code == 404:
                        # Not declared yet (no worker of the new topology has started): no jobs in it.
                        ready[queue] = 0
                    else:
                        log.info("provision.passive_depth_unavailable", queue=queue, error=str(exc)[:300])
        finally:
            if conn.is_open:
                conn.close()
    except pika.exceptions.AMQPError as exc:  # broker briefly away
        log.info("provision.passive_depth_unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
    unread = [q for q in queues if q not in sampled and q not in ready]
    if unread:
        raise ConfigError(
            f"cannot read the backlog of {', '.join(unread)}: neither the management API nor AMQP answered"
        )
    return {q: max(sampled.get(q, 0), ready.get(q, 0) + unacked.get(q, 0)) for q in queues}


def current_backlog(queues: Sequence[str] | None = None) -> int:
    """The backlog that drives a pool: the sum over its queues (default: the extraction queue)."""
    if not queues:
        from cbmflow.settings import BusSettings

        queues = (BusSettings().queue,)
    return sum(queue_backlogs(queues).values())


def _one_pool(settings: ProvisionSettings) -> Pool:
    resolved = poolsmod.resolve(settings)
    if len(resolved) != 1:
        raise ConfigError(
            f"{len(resolved)} pools are configured and this steps one: pass one of settings.resolved_pools(),"
            " or use scale_pools"
        )
    return resolved[0]


def run_step(
    settings: ProvisionSettings,
    *,
    dry_run: bool = False,
    driver: WorkerDriver | None = None,
    backlog: int | None = None,
) -> tuple[Plan, Applied]:
    """One locked control step of one pool with its persisted history; what ``scale`` and ``watch``
    run for every pool. ``settings`` is the pool (without ``pools``, or with exactly one)."""
    pool = _one_pool(settings)
    settings = pool.settings
    if backlog is None:
        backlog = current_backlog(pool.queues)
    driver = driver or make_driver(settings)
    history = FileHistory(state_dir() / f"provision-{_pool_key(settings)}.json")
    controller = Controller(driver, Policy.from_settings(settings), history)
    with _scale_lock(settings):
        step, applied = controller.step(backlog, dry_run=dry_run)
    log.info(
        "provision.plan" if dry_run else "provision.scaled",
        pool=pool.name,
        queues=list(pool.queues),
        dry_run=dry_run,
        backlog=backlog,
        fleet=step.fleet,
        want=step.want,
        target=step.target,
        started=applied.started,
        drained=applied.drained,
        deleted=applied.deleted,
        reason=step.reason,
    )
    return step, applied


@dataclass(frozen=True)
class PoolStep:
    """One pool's control step: its plan and what was done, or why the step failed."""

    pool: Pool
    plan: Plan | None = None
    applied: Applied | None = None
    error: str = ""


def scale_pools(
    settings: ProvisionSettings | None = None,
    *,
    dry_run: bool = False,
    names: Sequence[str] | None = None,
    drivers: Mapping[str, WorkerDriver] | None = None,
    backlogs: Mapping[str, int] | None = None,
) -> list[PoolStep]:
    """One control step of every pool (or of the named ones), each on its own queues.

    A pool whose step fails (its cloud or its queue unreachable) is logged and reported; the
    others are still stepped, so a CARD pool's trouble never stops extraction from scaling.
    ``drivers`` and ``backlogs`` override, per pool name, the driver made and the broker reading.
    """
    steps = []
    for pool in poolsmod.select(poolsmod.resolve(settings or ProvisionSettings()), list(names or [])):
        try:
            plan, applied = run_step(
                pool.settings,
                dry_run=dry_run,
                driver=(drivers or {}).get(pool.name),
                backlog=(backlogs or {}).get(pool.name),
            )
        except Exception as exc:  # noqa: BLE001 - config, broker, cloud and registry errors come in many types
            error = f"{type(exc).__name__}: {exc}"[:500]
            log.error("provision.step_failed", pool=pool.name, error=error)
            steps.append(PoolStep(pool, error=error))
            continue
        steps.append(PoolStep(pool, plan, applied))
    return steps


def _sum_plans(steps: list[PoolStep]) -> Plan:
    plans = [(s.pool.name, s.plan) for s in steps if s.plan is not None]
    return Plan(
        backlog=sum(p.backlog for _, p in plans),
        fleet=sum(p.fleet for _, p in plans),
        want=sum(p.want for _, p in plans),
        start=sum(p.start for _, p in plans),
        actions=tuple(a for _, p in plans for a in p.actions),
        target=sum(p.target for _, p in plans),
        reason="; ".join(f"{name}: {p}" for name, p in plans),
    )


def scale_once(
    settings: ProvisionSettings | None = None,
    *,
    dry_run: bool = False,
    driver: WorkerDriver | None = None,
    backlog: int | None = None,
) -> Plan:
    """One control step; ``backlog`` overrides the broker reading (tests, what-if runs).

    With one pool (the default), that pool's plan. With several, every pool is stepped and the
    plan returned is their sum (``scale_pools`` has each); ``driver`` and ``backlog`` then name
    no pool and are refused, and a pool whose step failed raises once the others are done.
    """
    settings = settings or ProvisionSettings()
    resolved = poolsmod.resolve(settings)
    if len(resolved) == 1:
        return run_step(resolved[0].settings, dry_run=dry_run, driver=driver, backlog=backlog)[0]
    if driver is not None or backlog is not None:
        raise ConfigError("a driver or backlog override needs one pool: use scale_pools(drivers=, backlogs=)")
    steps = scale_pools(settings, dry_run=dry_run)
    failed = [s for s in steps if s.error]
    if failed:
        raise CbmflowError("; ".join(f"pool {s.pool.name}: {s.error}" for s in failed))
    return _sum_plans(steps)


@dataclass(frozen=True)
class PoolStatus:
    """What ``provision status`` shows of a pool: its queues and backlog, the law's want, its fleet."""

    pool: Pool
    workers: list[WorkerView]
    backlog: int | None
    want: int | None
    target: int | None
    error: str = ""

    def count(self, *states: str) -> int:
        return sum(1 for w in self.workers if w.state in states)

    def summary(self) -> dict[str, Any]:
        return {
            "pool": self.pool.name,
            "job_kinds": list(self.pool.job_kinds),
            "queues": list(self.pool.queues),
            "flavor": self.pool.settings.flavor,
            "min_workers": self.pool.settings.min_workers,
            "max_workers": self.pool.settings.max_workers,
            "per_worker": self.pool.settings.per_worker,
            "backlog": self.backlog,
            "want": self.want,
            "window_target": self.target,
            "running": self.count("idle", "busy", "unknown"),
            "busy": self.count("busy"),
            "booting": self.count("starting"),
            "draining": self.count("draining"),
            "stopped": self.count("stopped"),
            "error": self.error,
        }


def pool_status(settings: ProvisionSettings | None = None, names: Sequence[str] | None = None) -> list[PoolStatus]:
    """Each pool's fleet, backlog and want, read without taking its step lock or changing anything.

    The want is the control law's (``decide`` over the pool's saved window), so it is what the next
    step would aim at. A pool whose fleet or queue cannot be read still shows, with the error.
    """
    out = []
    for pool in poolsmod.select(poolsmod.resolve(settings or ProvisionSettings()), list(names or [])):
        errors = []
        workers: list[WorkerView] = []
        try:
            workers = make_driver(pool.settings).list_workers()
        except Exception as exc:  # noqa: BLE001 - status shows what it can
            errors.append(f"fleet: {type(exc).__name__}: {exc}"[:300])
        backlog: int | None = None
        try:
            backlog = current_backlog(pool.queues)
        except Exception as exc:  # noqa: BLE001 - status shows what it can
            errors.append(f"backlog: {type(exc).__name__}: {exc}"[:300])
        want = target = None
        if backlog is not None:
            history = FileHistory(state_dir() / f"provision-{_pool_key(pool.settings)}.json").load()
            plan, _ = decide(time.time(), backlog, workers, Policy.from_settings(pool.settings), history, None)
            want, target = plan.want, plan.target
        out.append(PoolStatus(pool, workers, backlog, want, target, "; ".join(errors)))
    return out


def pool_fleets(
    settings: ProvisionSettings | None = None, names: Sequence[str] | None = None
) -> list[tuple[Pool, WorkerDriver, list[WorkerView]]]:
    """Every (named) pool with its driver and its workers: what drain, down, logs and exec search."""
    out = []
    for pool in poolsmod.select(poolsmod.resolve(settings or ProvisionSettings()), list(names or [])):
        driver = make_driver(pool.settings)
        out.append((pool, driver, driver.list_workers()))
    return out


def wait_down(driver: WorkerDriver, timeout_s: float, poll_s: float = 0.5) -> list[str]:
    """Wait for drained workers to stop, deleting each stopped one; returns those left at the deadline.

    Only stopped workers are deleted here, so a worker finishing a long job is waited for, not killed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        workers = driver.list_workers()
        stopped = [w.id for w in workers if w.state == "stopped"]
        if stopped:
            driver.delete(stopped)
        left = [w.id for w in workers if w.id not in stopped]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)
